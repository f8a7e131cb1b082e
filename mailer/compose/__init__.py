"""Composing: templates rendered per topic set, message bytes, DKIM."""
