"""api_keys.manage_keys and api_keys.created_by: who may mint and revoke keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:45:00

Existing non-admin keys get manage_keys = false: before this revision any key could mint
keys, so nothing tells a tenant's root key from one it minted. An admin mints a new key with
`manage_keys: true` for each tenant that manages its own keys.
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('manage_keys', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column('created_by', sa.String(length=40), nullable=True))
        batch_op.create_foreign_key('fk_api_keys_created_by', 'api_keys', ['created_by'],
                                    ['id'])
        batch_op.create_index(batch_op.f('ix_api_keys_created_by'), ['created_by'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_created_by'))
        batch_op.drop_constraint('fk_api_keys_created_by', type_='foreignkey')
        batch_op.drop_column('created_by')
        batch_op.drop_column('manage_keys')
