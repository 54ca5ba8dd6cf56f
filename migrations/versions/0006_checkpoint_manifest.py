"""checkpoints.manifest and checkpoints.attempt: a checkpoint resumable on any node

Revision ID: 0006_checkpoint_manifest
Revises: 0005_model_store
Create Date: 2026-12-06 12:00:00

A worker records a checkpoint only once every file of it is in the store (issue 12):
`manifest` = {"files": [{path, size, sha256}]} of what was uploaded under `path` (the store
prefix `jobs/<job>/attempt-<N>/checkpoints/step-<S>`), which the node that resumes it verifies
after downloading; `attempt` is the attempt that wrote it. Rows written before this revision
have neither (their files are in the old single-node layout).
"""
import sqlalchemy as sa
from alembic import op

revision = '0006_checkpoint_manifest'
down_revision = '0005_model_store'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints') as batch:
        batch.add_column(sa.Column('manifest', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('attempt', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('checkpoints') as batch:
        batch.drop_column('attempt')
        batch.drop_column('manifest')
