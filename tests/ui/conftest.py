"""The dashboard suite's server: `live` (fake trainer), from tests/client/live.py."""

from tests.client.live import live  # noqa: F401 - a fixture, used by name
