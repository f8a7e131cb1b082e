"""Subscribers: addresses, signed tokens and links, the one subscriber store, sign-up and a link
holder's changes (lifecycle), a person's data (personal), CSV rows and the COPY importer."""
