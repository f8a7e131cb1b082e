"""Feeds: fetch (HTTP), html (to plain text), parse (to articles), state (the feed_state table)."""
