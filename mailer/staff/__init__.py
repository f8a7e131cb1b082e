"""Mail to staff: the outbox it waits in, the alerts that raise it."""
