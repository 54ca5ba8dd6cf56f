"""job_metrics: DPO's per-step reward figures (issue 13)

Revision ID: 0011_dpo_metrics
Revises: 0010_serving
Create Date: 2026-12-06 13:10:00

Means over a logged step's preference pairs of the implicit rewards beta * (log pi - log ref)
of the chosen and rejected answers, their margin, and the fraction of pairs ranked right.
Null for supervised steps.
"""
import sqlalchemy as sa
from alembic import op

revision = '0011_dpo_metrics'
down_revision = '0010_serving'
branch_labels = None
depends_on = None

COLUMNS = ('rewards_chosen', 'rewards_rejected', 'reward_margin', 'reward_accuracy')


def upgrade() -> None:
    with op.batch_alter_table('job_metrics', schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_metrics', schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
