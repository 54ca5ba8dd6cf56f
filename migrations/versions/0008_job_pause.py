"""jobs.pause_requested: a running job asked to checkpoint and pause (issue 13)

Revision ID: 0008_job_pause
Revises: 0007_webhooks
Create Date: 2026-12-06 12:00:00

`paused` itself is a value of jobs.status (a plain string column, no constraint to change).
"""
import sqlalchemy as sa
from alembic import op

revision = '0008_job_pause'
down_revision = '0007_webhooks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pause_requested', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('pause_requested')
