"""The live-service fixture for the worker tests (defined in tests/servicefixtures.py)."""

from tests.servicefixtures import live_service  # noqa: F401 - a fixture, used by name
