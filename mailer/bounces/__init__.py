"""Bounces and complaints: VERP addresses, delivery and feedback reports, the mailbox they
arrive in, and applying them to subscribers."""
