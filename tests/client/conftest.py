"""The SDK suite's servers: `live` (fake trainer) and `live_real` (real trainer), from
tests/client/live.py."""

from tests.client.live import live, live_real  # noqa: F401 - fixtures, used by name
