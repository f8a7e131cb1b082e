"""Alembic environment: runs on the engine the caller passes (``mailer init``)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from mailer.db.schema import metadata
from mailer.errors import MailerError

engine = context.config.attributes.get("engine")
if engine is None:
    from mailer.db.engine import create_engine

    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("alembic: pass a database with `mailer init`, or set sqlalchemy.url")
    engine = create_engine(url)


def _driver(connection: sa.Connection) -> Any:
    return connection.connection.dbapi_connection


def _foreign_keys(connection: sa.Connection, *, on: bool) -> None:
    """Turn SQLite's foreign keys on or off on this connection, outside any transaction.

    A batch migration rebuilds a table on SQLite (copy, DROP, rename); with foreign keys on,
    the DROP deletes every row first and cascades to the rows that reference them (dropping
    ``issues`` would empty ``issue_articles`` and ``deliveries``). SQLite ignores the pragma
    inside a transaction, so it goes straight to the driver, which runs it in autocommit.
    """
    _driver(connection).execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


sqlite = engine.dialect.name == "sqlite"
with engine.connect() as connection:
    if sqlite:
        _foreign_keys(connection, on=False)
    try:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").first()
                if broken is not None:
                    raise MailerError(
                        "the migration left a row without its parent (table, rowid, parent,"
                        f" key): {tuple(broken)}; nothing was changed"
                    )
        connection.commit()
    finally:
        if sqlite:
            _foreign_keys(connection, on=True)
