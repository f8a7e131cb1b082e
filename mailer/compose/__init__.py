"""Composing: templates rendered per topic set (rendering), per-recipient message bytes
(messages, wire) and DKIM signing (dkim)."""
