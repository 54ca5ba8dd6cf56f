"""Every failure the CLI reports is one line on stderr: what went wrong, and what to do.

    error: bad.jsonl: 2 bad lines (line 2: not valid JSON; line 3: output: missing field ...)
           - fix these lines and upload again
    error: invalid API key - pass --api-key or set LORAJOBS_API_KEY

`UserError` is for problems the CLI finds itself (a spec that does not parse, a typo in a
field name); SDK and lora_core errors are rendered here too, so `main()` has one place to
turn any of them into that line and exit code 1.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["UserError", "one_line", "spec_problems", "dataset_problems"]

MAX_LINES_SHOWN = 3  # bad data lines named in the one-line message; the rest are counted


class UserError(Exception):
    """A problem with the user's input, found by the CLI; its text is the whole message."""


def dataset_problems(name: str, errors: list[dict[str, Any]], total: int | None = None) -> str:
    """`name: N bad lines (line 2: ...; line 5: field: ...) - fix ... ` on one line."""
    total = total if total is not None else len(errors)
    shown = []
    for e in errors[:MAX_LINES_SHOWN]:
        field = f"{e['field']}: " if e.get("field") else ""
        where = f"line {e['line']}: " if e.get("line") else ""
        shown.append(f"{where}{field}{e.get('message', '')}".strip())
    more = f"; +{total - len(shown)} more" if total > len(shown) else ""
    plural = "line" if total == 1 else "lines"
    return (f"{name}: {total} bad {plural} ({'; '.join(shown)}{more}) - fix "
            f"{'it' if total == 1 else 'them'} and try again "
            f"(`lorajobs validate-data {name}` lists every problem)")


def _fields_at(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """The field names one level below `path` in a pydantic model (for "did you mean")."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def spec_problems(spec: dict[str, Any], model: type[BaseModel], source: str) -> str | None:
    """Validate a job spec locally; a one-line description of the first problem, or None.

    A typo in a field name is the common mistake, so an unknown field gets the closest valid
    name as a suggestion.
    """
    try:
        model.model_validate(spec)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = [p for p in first["loc"] if isinstance(p, str | int)]
        field = ".".join(str(p) for p in loc) or "spec"
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc[:-1]), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            text = f"{source}: unknown field '{field}'{hint}"
        else:
            text = f"{source}: {field}: {first['msg']}"
        more = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return text + more
    return None


def one_line(exc: BaseException) -> str:
    """The message for any error the CLI reports, with the fix when we know it."""
    from lora_core.errors import DatasetError
    from lorajobs.client.errors import (
        APIConnectionError,
        APIError,
        AuthenticationError,
        NotFoundError,
    )

    if isinstance(exc, DatasetError) and exc.errors:
        return dataset_problems(str(exc.param or "dataset"), exc.errors)
    if isinstance(exc, AuthenticationError):
        return (f"{exc.message} - pass --api-key or set LORAJOBS_API_KEY (the embedded server "
                "writes its admin key to ~/.lorajobs/admin_key)")
    if isinstance(exc, NotFoundError):
        what = {"job_id": "jobs", "dataset_id": "datasets", "training_file": "datasets",
                "validation_file": "datasets", "base_model": "models"}.get(exc.param or "")
        hint = f" - see `lorajobs {what} list`" if what else ""
        return f"{exc.message}{hint}"
    if isinstance(exc, APIError) and exc.errors and exc.errors[0].get("line"):
        return dataset_problems(str(exc.param or "dataset"), exc.errors)
    if isinstance(exc, APIConnectionError):
        return (f"{exc} - is the server running? (`lorajobs serve`; or --url / LORAJOBS_URL)")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
