"""Arithmetic formulas of an expectations file, parsed and evaluated without ``eval``.

Numbers, plain or dotted names and ``+ - * / // % **`` only; a name is looked up in the mapping given to
:func:`evaluate` (vars, run columns, ``config.<key>``: :mod:`.expectations` resolves them).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

from stackwise_bench.errors import ConfigError

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def parse_formula(text: str) -> ast.Expression:
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"formula {text!r} is not an arithmetic expression; write e.g. 48 * d * r + head.") from exc
    for node in ast.walk(tree):
        if not isinstance(
            node,
            (
                ast.Expression,
                ast.BinOp,
                ast.UnaryOp,
                ast.Constant,
                ast.Name,
                ast.Attribute,
                ast.Load,
                ast.USub,
                ast.UAdd,
                *_BINOPS,
            ),
        ):
            raise ConfigError(
                f"formula {text!r} uses {type(node).__name__}; only numbers, names and + - * / // % ** are allowed."
            )
    return tree


def evaluate(node: ast.AST, names: Mapping[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return evaluate(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, (ast.Name, ast.Attribute)):
        return names[_dotted(node)]
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](evaluate(node.left, names), evaluate(node.right, names))
    raise ConfigError(f"formula part {ast.dump(node)} is not a number or a name.")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ConfigError("formula names are plain or dotted identifiers, e.g. lora.rank.")
