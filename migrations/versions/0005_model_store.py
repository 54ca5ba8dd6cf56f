"""models in the object store: source, storage_prefix, content_sha256, files, revision, info

Revision ID: 0005_model_store
Revises: 0004
Create Date: 2026-12-06 12:00:00

A model registered from an upload, an `s3://` prefix or a Hugging Face repo lives in the
artifact store under `models/<content_sha256>/` (lorajobs/core/model_import.py); workers
fetch it into their node-local cache (lorajobs/worker/model_cache.py). `files` is its
manifest `[{path, size, sha256}]`, `content_sha256` the hash over that sorted manifest (the
cache key), `info` the header facts the API checks a job's `lora` section against without
the files. Legacy rows (`source` "path") keep `path` under the model root; `path` becomes
nullable because a stored model has none.
"""
import sqlalchemy as sa
from alembic import op

revision = '0005_model_store'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=10), nullable=False,
                                      server_default='path'))
        batch_op.add_column(sa.Column('storage_prefix', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('content_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('files', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('revision', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('info', sa.JSON(), nullable=True))
        batch_op.alter_column('path', existing_type=sa.String(length=500), nullable=True)
        batch_op.create_index('ix_models_content_sha256', ['content_sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index('ix_models_content_sha256')
        batch_op.alter_column('path', existing_type=sa.String(length=500), nullable=False)
        batch_op.drop_column('info')
        batch_op.drop_column('revision')
        batch_op.drop_column('files')
        batch_op.drop_column('content_sha256')
        batch_op.drop_column('storage_prefix')
        batch_op.drop_column('source')
