"""Alembic environment for the igat service.

The database URL comes from (first found): ``config.attributes["database_url"]`` (set by
``service.db.alembic_config``), ``-x database_url=...`` on the command line, then ``IGAT_DATABASE_URL`` /
the settings default. Batch mode is on so that SQLite, which lacks most of ALTER TABLE, takes the same
migrations as PostgreSQL.

On SQLite, batch mode rebuilds a table (copy, drop the old one, rename), and with foreign keys enforced dropping
``experiments`` would cascade to the rows of ``events``, ``metrics`` and ``artifacts``. So migrations run with
foreign keys off (the pragma works only outside a transaction: it is set when the connection opens) and end with
``PRAGMA foreign_key_check``, which must find nothing.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, Engine, event

from service.db import make_engine, normalise_url
from service.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("database_url") or context.get_x_argument(as_dictionary=True).get("database_url")
    if not url:
        from service.settings import Settings

        url = Settings().database_url
    return normalise_url(url)


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        compare_server_default=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _without_sqlite_foreign_keys(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _foreign_keys_off(dbapi_connection, _record) -> None:  # after service.db's listener, which turns them on
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_database_url())
    _without_sqlite_foreign_keys(engine)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
