"""Delivery: the pure policy, the ledger's SQL, the worker and what it composes, the SMTP pool
and its pipelined fast path, pacing, leases held by others, helper processes."""
