"""The database: engine, schema, write lock, audit events, outages, migrations."""
