"""Alembic environment shared by every service: migrations run on the connection we pass in,
inside the service's own schema, with the version table kept in that schema too."""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes["connection"]
schema: str = config.attributes["schema"]

connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
context.configure(
    connection=connection,
    target_metadata=None,
    version_table="alembic_version",
    version_table_schema=schema,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
