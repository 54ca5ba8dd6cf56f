"""tenants.last_claimed_at: the fair claim order across tenants

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:30:00
"""
import sqlalchemy as sa
from alembic import op

import lorajobs.core.tables

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'last_claimed_at', lorajobs.core.tables.UTCDateTime(timezone=True),
            nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('last_claimed_at')
