"""Delivery: claims, the ledger, the worker, the SMTP pool and its fast path, helper processes."""
