"""Bounces and complaints: VERP, delivery and feedback reports, mailboxes, applying them."""
