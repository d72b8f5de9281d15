"""Alembic environment for the igat service.

The database URL comes from (first found): ``config.attributes["database_url"]`` (set by
``service.db.alembic_config``), ``-x database_url=...`` on the command line, then ``IGAT_DATABASE_URL`` /
the settings default. Batch mode is on so that SQLite, which lacks most of ALTER TABLE, takes the same
migrations as PostgreSQL.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

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


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
