"""Delivery: the pure policy, claims and the ledger's SQL, the worker with its leases, commits
and composers, one issue sent in the foreground, the SMTP pool and its pipelined fast path,
pacing, helper processes."""
