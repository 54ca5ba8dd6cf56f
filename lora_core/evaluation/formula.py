"""A multi grader's `calculate_output`: arithmetic over sub-grader scores, never `eval`.

The formula is parsed with `ast.parse(mode="eval")` and walked over a whitelist of nodes:
numbers, the sub-graders' names, `+ - * / %`, `**` and `^` (both power, as in OpenAI's
formulas), unary minus/plus, parentheses, and the calls `min max abs floor ceil exp sqrt log`.
Anything else (attributes, subscripts, comparisons, keywords, strings, lambdas, names that are
not sub-graders) is refused before a job starts. Exponents are bounded so a formula cannot burn
CPU or memory.

    check_formula("(name + 2 * email) / 3", {"name", "email"})
    evaluate_formula("(name + 2 * email) / 3", {"name": 1.0, "email": 0.5})  -> 0.666...
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

__all__ = ["FormulaError", "check_formula", "evaluate_formula", "FUNCTIONS"]

MAX_FORMULA_CHARS = 1000
MAX_EXPONENT = 64.0  # |b| in a ** b: enough for any scoring formula, cheap on floats
FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": lambda *a: min(a), "max": lambda *a: max(a), "abs": abs, "floor": math.floor,
    "ceil": math.ceil, "exp": math.exp, "sqrt": math.sqrt, "log": math.log,
}
_ARITY = {"min": None, "max": None, "abs": 1, "floor": 1, "ceil": 1, "exp": 1, "sqrt": 1,
          "log": 1}  # None: one or more


def _power(a: float, b: float) -> float:
    if abs(b) > MAX_EXPONENT:
        raise FormulaError(f"exponent {b} is larger than {MAX_EXPONENT}")
    return float(a) ** float(b)


_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Mod: operator.mod, ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


class FormulaError(ValueError):
    """A formula that does not parse, uses something outside the whitelist, or fails to
    compute (division by zero, log of 0)."""


def _parse(formula: str) -> ast.Expression:
    if len(formula) > MAX_FORMULA_CHARS:
        raise FormulaError(f"longer than {MAX_FORMULA_CHARS} characters")
    try:
        # `^` is power with power's precedence (-a^2 = -(a^2), a + b^2 = a + (b^2)); Python
        # parses `^` as xor, below + and unary minus. No string literal is allowed, so the
        # textual swap cannot change anything but operators.
        return ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise FormulaError(f"does not parse: {getattr(exc, 'msg', exc)}") from None


def _walk(node: ast.AST, names: set[str], values: dict[str, float] | None) -> float:
    """Check (values None: returns 0.0) or compute one node."""
    if isinstance(node, ast.Expression):
        return _walk(node.body, names, values)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) \
            and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise FormulaError(f"unknown name {node.id!r} (sub-graders: {sorted(names)})")
        return 0.0 if values is None else float(values[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left, names, values), _walk(node.right, names, values)
        return 0.0 if values is None else _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        inner = _walk(node.operand, names, values)
        return 0.0 if values is None else _UNARY[type(node.op)](inner)
    if isinstance(node, ast.Call):
        return _call(node, names, values)
    raise FormulaError(f"{type(node).__name__} is not allowed (numbers, sub-grader names, "
                       "+ - * / % ** ^, and " + ", ".join(FUNCTIONS) + " only)")


def _call(node: ast.Call, names: set[str], values: dict[str, float] | None) -> float:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
        raise FormulaError("only calls of " + ", ".join(FUNCTIONS) + " are allowed")
    arity = _ARITY[node.func.id]
    if (arity is None and not node.args) or (arity is not None and len(node.args) != arity):
        raise FormulaError(f"{node.func.id}() takes {arity or 'one or more'} argument(s)")
    args = [_walk(a, names, values) for a in node.args]
    return 0.0 if values is None else float(FUNCTIONS[node.func.id](*args))


def check_formula(formula: str, names: set[str]) -> None:
    """Raise FormulaError unless `formula` uses only the whitelist and these names."""
    try:
        _walk(_parse(formula), names, None)
    except RecursionError:
        raise FormulaError("nested too deeply") from None


def evaluate_formula(formula: str, values: dict[str, Any]) -> float:
    """The formula's value for these sub-grader scores."""
    try:
        result = _walk(_parse(formula), set(values), {k: float(v) for k, v in values.items()})
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as exc:
        if isinstance(exc, FormulaError):
            raise
        raise FormulaError(f"cannot compute: {exc}") from None
    except RecursionError:
        raise FormulaError("nested too deeply") from None
    if not math.isfinite(result):
        raise FormulaError(f"the result is {result}")
    return result
