"""The serving suite's harness: the API tests' app (`api`: three tenants, a registered model)."""

from tests.api.conftest import api, api_settings  # noqa: F401 - fixtures, used by name
from tests.dbfixtures import db_settings  # noqa: F401 - the parametrized fixture
