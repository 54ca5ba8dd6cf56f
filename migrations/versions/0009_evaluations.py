"""job_evaluations: graded generations per (job, step); step 0 is the base model (issue 14)

Revision ID: 0009_evaluations
Revises: 0008_job_pause
Create Date: 2026-12-06 12:15:00

One row per evaluation: the mean score per grader (+ valid_loss) and the samples (prompt,
reference, base output, this step's output, per-grader scores). A resumed run that evaluates a
step again overwrites its row.
"""
import sqlalchemy as sa
from alembic import op

import lorajobs.core.tables

revision = '0009_evaluations'
down_revision = '0008_job_pause'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_evaluations',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
                  nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('scores', sa.JSON(), nullable=False),
        sa.Column('samples', sa.JSON(), nullable=False),
        sa.Column('created_at', lorajobs.core.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'step', name='uq_job_evaluations_step'),
    )
    op.create_index(op.f('ix_job_evaluations_job_id'), 'job_evaluations', ['job_id'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_job_evaluations_job_id'), table_name='job_evaluations')
    op.drop_table('job_evaluations')
