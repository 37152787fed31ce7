"""the database names its object store: a random id, also in the store's marker object, so an orphan sweep never
runs against another store's objects (RetentionStore.owns_its_objects); a database that already holds results
gets its id here, as legacy: its store, without a marker yet, is adopted once its results are found there

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "store_id",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("store_id", sa.String(32), nullable=False),
        sa.Column("legacy", sa.Boolean(), nullable=False),
    )
    if op.get_context().as_sql:
        return
    if op.get_bind().execute(sa.text("SELECT 1 FROM results LIMIT 1")).first() is not None:
        op.bulk_insert(table, [{"id": 1, "store_id": uuid.uuid4().hex, "legacy": True}])


def downgrade() -> None:
    op.drop_table("store_id")
