"""Alembic environment: runs on the engine the caller passes (``mailer init``)."""

from __future__ import annotations

from alembic import context

from mailer.db.schema import metadata

engine = context.config.attributes.get("engine")
if engine is None:
    from mailer.db.engine import create_engine

    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("alembic: pass a database with `mailer init`, or set sqlalchemy.url")
    engine = create_engine(url)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
