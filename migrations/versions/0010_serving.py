"""serving_targets and deployments: finished adapters published to vLLM servers (issue 16)

Revision ID: 0010_serving
Revises: 0009_evaluations
Create Date: 2026-12-06 12:40:00
"""
import sqlalchemy as sa
from alembic import op

import lorajobs.core.tables

revision = '0010_serving'
down_revision = '0009_evaluations'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'serving_targets',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('urls', sa.JSON(), nullable=False),
        sa.Column('base_models', sa.JSON(), nullable=False),
        sa.Column('api_key', sa.String(length=500), nullable=True),
        sa.Column('adapter_dir', sa.String(length=1000), nullable=False),
        sa.Column('server_adapter_dir', sa.String(length=1000), nullable=True),
        sa.Column('max_lora_rank', sa.Integer(), nullable=False),
        sa.Column('supported_modules', sa.JSON(), nullable=False),
        sa.Column('created_at', lorajobs.core.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_table(
        'deployments',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('target', sa.String(length=100), nullable=False),
        sa.Column('step', sa.Integer(), nullable=True),
        sa.Column('model_name', sa.String(length=300), nullable=False),
        sa.Column('adapter_path', sa.String(length=1000), nullable=False),
        sa.Column('servers', sa.JSON(), nullable=False),
        sa.Column('created_at', lorajobs.core.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', lorajobs.core.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('target', 'model_name', name='uq_deployments_model'),
    )
    op.create_index(op.f('ix_deployments_tenant_id'), 'deployments', ['tenant_id'])
    op.create_index(op.f('ix_deployments_job_id'), 'deployments', ['job_id'])
    op.create_index(op.f('ix_deployments_model_name'), 'deployments', ['model_name'])


def downgrade() -> None:
    op.drop_index(op.f('ix_deployments_model_name'), table_name='deployments')
    op.drop_index(op.f('ix_deployments_job_id'), table_name='deployments')
    op.drop_index(op.f('ix_deployments_tenant_id'), table_name='deployments')
    op.drop_table('deployments')
    op.drop_table('serving_targets')
