"""lora_core: the LoRA fine-tuning workflow as a library: spec in, files and progress out.

Knows nothing of HTTP, SQL or Celery. Importing the package is torch-free (the API imports
`lora_core.spec`, `lora_core.data.formats` and `lora_core.model_files`); the modules that need
torch (`layer`, `peft_setup`, `train`, `merge`, `tiny`) import it themselves.
"""

from lora_core.errors import (
    DatasetError,
    LoraCoreError,
    MergeError,
    ModelError,
    SpecError,
    StorageError,
    TrainingError,
)
from lora_core.spec import DistributedSpec, LoraSpec, RunSpec, TrainingSpec

__all__ = [
    "DatasetError",
    "LoraCoreError",
    "MergeError",
    "ModelError",
    "SpecError",
    "StorageError",
    "TrainingError",
    "DistributedSpec",
    "LoraSpec",
    "RunSpec",
    "TrainingSpec",
]
