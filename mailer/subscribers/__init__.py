"""Subscribers: addresses, tokens and links, the one subscriber store, the importer."""
