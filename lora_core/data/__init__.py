"""Training data: formats (torch-free), tokenisation, collation, the synthetic demo task.

Importing this package stays torch-free: the API imports `lora_core.data.formats` to validate
uploads. `tokenize`, `collate` and `synthetic` are imported by their full names when needed.
"""

from lora_core.data.formats import (
    ValidationReport,
    detect_format,
    load_examples,
    validate_file,
)

__all__ = ["ValidationReport", "detect_format", "load_examples", "validate_file"]
