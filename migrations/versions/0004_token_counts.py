"""token_counts: a dataset's tokens per (content, format, model, max_seq_length)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:10:00

Filled by the worker from the trainer's `started` event (lorajobs/core/tokencounts.py), read
by POST /v1/jobs for the estimate: the API no longer tokenises a dataset on every submit.
"""
import sqlalchemy as sa
from alembic import op

import lorajobs.core.tables

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'token_counts',
        sa.Column('dataset_sha256', sa.String(length=64), nullable=False),
        sa.Column('format', sa.String(length=20), nullable=False),
        sa.Column('model_id', sa.String(length=40), nullable=False),
        sa.Column('max_seq_length', sa.Integer(), nullable=False),
        sa.Column('num_tokens', sa.BigInteger(), nullable=False),
        sa.Column('num_truncated', sa.Integer(), nullable=True),
        sa.Column('num_dropped', sa.Integer(), nullable=True),
        sa.Column('created_at', lorajobs.core.tables.UTCDateTime(timezone=True),
                  nullable=False),
        sa.PrimaryKeyConstraint('dataset_sha256', 'format', 'model_id', 'max_seq_length'),
    )


def downgrade() -> None:
    op.drop_table('token_counts')
