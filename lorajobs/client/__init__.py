"""The lorajobs Python SDK: `Client` (sync) and `AsyncClient`, typed results, clear errors."""

from lorajobs.client.aio import AsyncClient
from lorajobs.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ChecksumError,
    ConflictError,
    InvalidRequestError,
    LorajobsError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    UnsafePathError,
)
from lorajobs.client.sync import Client
from lorajobs.client.types import (
    Artifact,
    Checkpoint,
    Dataset,
    Event,
    Job,
    MetricRow,
    Model,
    Webhook,
    WebhookDelivery,
)

__all__ = [
    "Client",
    "AsyncClient",
    "LorajobsError",
    "APIConnectionError",
    "APIError",
    "AuthenticationError",
    "ChecksumError",
    "ConflictError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "UnsafePathError",
    "Artifact",
    "Checkpoint",
    "Dataset",
    "Event",
    "Job",
    "MetricRow",
    "Model",
    "Webhook",
    "WebhookDelivery",
]
