"""Alembic environment of the reference app (used by the app's ``migrate`` job and by the ``alembic`` CLI).

The URL comes from ``config.attributes["sqlalchemy_url"]`` (set by the app), else ``DATABASE_URL``, else
``sqlalchemy.url`` in alembic.ini. Alembic always gets a connection of its own here; the app's migration guard
(PostgreSQL advisory lock) lives on a different, dedicated connection: a lock taken on this one would open a
transaction that Alembic then never commits.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import event

from demo.db import database_url, make_engine, normalize_url
from demo.models import Base

config = context.config
# Only the alembic CLI has an ini file; inside gunicorn the server's logging must stay as configured.
if config.config_file_name is not None and config.attributes.get("sqlalchemy_url") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("sqlalchemy_url")
    if url:
        return str(url)
    ini_url = config.get_main_option("sqlalchemy.url")
    if os.environ.get("DATABASE_URL") or not ini_url:
        return database_url()
    return normalize_url(ini_url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url(), pooled=False)
    sqlite = engine.url.get_backend_name() == "sqlite"
    if sqlite:
        # pysqlite autocommits DDL; take over BEGIN so each revision's DDL and data commit together.
        @event.listens_for(engine, "connect")
        def _no_implicit_transactions(dbapi_connection, connection_record):  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN")

    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                transaction_per_migration=True,
                render_as_batch=sqlite,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
