"""The database: engine, schema, write lock, the audit trail, outages, Alembic migrations."""
