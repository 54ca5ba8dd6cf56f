"""jobs.deploy_target: deploy the job's adapter to this serving target once it succeeds (#16)

Revision ID: 0012_job_deploy_target
Revises: 0011_dpo_metrics
Create Date: 2026-12-06 13:25:00

Set at submit from the spec's `deploy.target`; the serving reconciler (beat, serve) deploys a
succeeded job that still has it, then clears it, so each job is deployed automatically once.
"""
import sqlalchemy as sa
from alembic import op

revision = '0012_job_deploy_target'
down_revision = '0011_dpo_metrics'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deploy_target', sa.String(100), nullable=True))
        batch_op.create_index('ix_jobs_deploy_target', ['deploy_target'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_deploy_target')
        batch_op.drop_column('deploy_target')
