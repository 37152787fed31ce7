"""the database names its object store: a random id, also in the store's marker object, so an orphan sweep never
runs against another store's objects (RetentionStore.owns_its_objects); a database upgraded from an earlier
revision gets its id as legacy (serve.retention.db._upgrade, which knows where the upgrade started): its store,
without a marker yet, is adopted (as any store without a marker) when at most 1% of its objects are ones the
database does not know (serve.retention.store.ADOPT_UNREFERENCED; an empty store qualifies)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

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
    del table


def downgrade() -> None:
    op.drop_table("store_id")
