"""A base model's files: what a directory holds (safetensors headers + config.json, no
tensor loaded), which modules a LoRA spec targets, the sha256 manifest, and the tiny
model the tests and the demo build. Torch-free except `tiny`, imported by its full name."""

from lora_core.model_files.headers import *  # noqa: F403
from lora_core.model_files.headers import __all__ as _headers_all
from lora_core.model_files.targets import *  # noqa: F403
from lora_core.model_files.targets import __all__ as _targets_all

__all__ = [*_headers_all, *_targets_all]
