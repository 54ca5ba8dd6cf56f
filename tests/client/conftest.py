"""The SDK suite's servers: `live` (fake trainer), `live_real` (real trainer) and
`live_webhooks` (fake trainer, webhooks sent), from tests/client/live.py."""

from tests.client.live import live, live_real, live_webhooks  # noqa: F401 - fixtures by name
