"""results have an owner: the team or name of the API key that created them

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))
    op.create_index("ix_results_owner", "results", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_results_owner", "results")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("owner")
