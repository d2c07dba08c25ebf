"""`torch.export.save`/`load` with three lookups memoised that torch 2.14's serializer repeats
for every node of a graph, and without the save's discarded self-check.

A CIFAR backbone's programs have a dynamic batch, height and width, so every tensor's size is
a sympy expression (`((s1 - 1)//2) + 1` after each stride), stored as sympy's `srepr` text.
Loading parses each of those texts with `sympy.sympify` (thousands per program, most of them
repeats) and resolves the schema classes' type hints with `typing.get_type_hints` once per
deserialised field (pytorch/pytorch#196452); saving prints each expression again. The three are
pure for a given input: memoised, the same programs come back (equal graphs, shapes, range
constraints and state; saved again, the same bytes) while loading the four programs of an
8-filter ResNet-34 takes 0.9 s instead of 3.2 s.

Saving also runs `canonicalize(serialized_program)` as a self-check ("Test canonical form is well
defined") and throws its result away; it deep-copies the whole serialized graph first, which is
more than half of a CNN program's save. Inside the block that call is skipped (ExecuTorch's own
copy of the serializer has it commented out): the bytes written are the same. It is skipped only
while torch's source shows the result discarded.

The memos live inside `memoised_serde()` only (torch's functions are restored after the last
nested use ends), so a user's own `torch.export` calls outside it see torch as installed. Where
torch's private names differ (another torch version), nothing is replaced and save/load run at
torch's own speed; `tests/test_program_serde.py` fails then, so the change is seen.
"""

import ast
import inspect
import sys
import textwrap
import types
import typing
from functools import lru_cache
from typing import Any, Callable, Dict, Optional

import torch

from export.formats.scoped_patch import ScopedPatch

#: expressions whose text is remembered at most (a CNN program has a few thousand)
_MAX_PRINTED = 100_000
_ORIGINALS: Dict[str, Any] = {}


def _serializer() -> Optional[types.ModuleType]:
    """torch's serializer module when it has the three functions memoised here, else None."""
    from torch._export.serde import serialize

    deserializer = getattr(serialize, "GraphModuleDeserializer", None)
    if (callable(getattr(deserializer, "_parse_sym_expr", None)) and callable(getattr(serialize, "_print_sympy", None))
            and getattr(serialize, "typing", None) is typing):
        return serialize
    return None


def _memoised_parse(parse: Callable[..., Any]) -> Callable[..., Any]:
    """`GraphModuleDeserializer._parse_sym_expr` remembering, per deserialiser, the expression
    each text gave. Parsing a text again returns that same expression in torch too (symbols are
    kept by name); what a repeat can still add, a size hint for a symbol without one, is left to
    torch."""

    def parse_once(self, expr_str, hint=None):
        if not isinstance(expr_str, str):
            return parse(self, expr_str, hint)
        # one memo per deserialisation: `deserialize` starts new symbol tables and a new ShapeEnv
        state = (self.symbol_name_to_symbol, self.shape_env)
        held = self.__dict__.get("_returnt_zoo_parsed")
        if held is None or held[0][0] is not state[0] or held[0][1] is not state[1]:
            held = self.__dict__["_returnt_zoo_parsed"] = (state, {})
        memo = held[1]
        expr = memo.get(expr_str)
        if expr is None or (hint is not None and expr not in self.shape_env.backed_var_to_val):
            expr = memo[expr_str] = parse(self, expr_str, hint)
        return expr

    return parse_once


def _memoised_print(print_sympy: Callable[[Any], str]) -> Callable[[Any], str]:
    """`_print_sympy` remembering the text of each expression object (by identity, held alive
    while remembered): the same object always prints to the same text."""
    texts: Dict[int, tuple] = {}

    def print_once(s):
        expr = s.node.expr if isinstance(s, (torch.SymInt, torch.SymBool, torch.SymFloat)) else s
        if len(texts) > _MAX_PRINTED:  # saves that keep the memos installed for long stay bounded
            texts.clear()
        held = texts.get(id(expr))
        if held is None or held[0] is not expr:
            held = texts[id(expr)] = (expr, print_sympy(expr))
        return held[1]

    return print_once


def _typing_with_cached_hints() -> types.ModuleType:
    """A stand-in for the `typing` module whose `get_type_hints` answers each (class, namespace)
    once; everything else is typing's own."""
    shim = types.ModuleType("typing")
    shim.__dict__.update(typing.__dict__)
    hints: Dict[tuple, tuple] = {}

    def get_type_hints(obj, globalns=None, localns=None, include_extras=False):
        # namespaces are dicts (unhashable): keyed by identity, and held so an id is never reused
        key = (obj, id(globalns), id(localns), include_extras)
        held = hints.get(key)
        if held is None or held[0] is not globalns or held[1] is not localns:
            held = hints[key] = (globalns, localns, typing.get_type_hints(
                obj, globalns=globalns, localns=localns, include_extras=include_extras))
        return held[2]

    shim.get_type_hints = get_type_hints
    return shim


@lru_cache(maxsize=1)
def _self_check_discarded(method: Callable[..., Any]) -> bool:
    """Whether `method` (torch's `ExportedProgramSerializer.serialize`) calls `canonicalize(...)`
    only as a bare statement, its result unused."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    except (OSError, TypeError, SyntaxError):
        return False

    def calls_canonicalize(node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "canonicalize")

    bare = [n for n in ast.walk(tree) if isinstance(n, ast.Expr) and calls_canonicalize(n.value)]
    every = [n for n in ast.walk(tree) if calls_canonicalize(n)]
    return len(bare) == len(every) == 1


def _without_self_check(canonicalize: Callable[..., Any], serializer_code: types.CodeType) -> Callable[..., Any]:
    """`canonicalize` that returns its input unchanged when the serializer's self-check calls it
    (its result is discarded there) and is torch's own for any other caller."""

    def canonicalize_elsewhere(ep, constants=None):
        if sys._getframe(1).f_code is serializer_code:
            return ep
        return canonicalize(ep, constants)

    return canonicalize_elsewhere


def _install() -> bool:
    serialize = _serializer()
    if serialize is None:
        return False
    cls = serialize.GraphModuleDeserializer
    _ORIGINALS.update(parse=cls.__dict__["_parse_sym_expr"], print=serialize._print_sympy, typing=serialize.typing)
    cls._parse_sym_expr = _memoised_parse(_ORIGINALS["parse"])
    serialize._print_sympy = _memoised_print(_ORIGINALS["print"])
    serialize.typing = _typing_with_cached_hints()
    method = getattr(getattr(serialize, "ExportedProgramSerializer", None), "serialize", None)
    if callable(getattr(serialize, "canonicalize", None)) and method is not None and _self_check_discarded(method):
        _ORIGINALS["canonicalize"] = serialize.canonicalize
        serialize.canonicalize = _without_self_check(serialize.canonicalize, method.__code__)
    return True


def _restore() -> None:
    from torch._export.serde import serialize

    serialize.GraphModuleDeserializer._parse_sym_expr = _ORIGINALS.pop("parse")
    serialize._print_sympy = _ORIGINALS.pop("print")
    serialize.typing = _ORIGINALS.pop("typing")
    if "canonicalize" in _ORIGINALS:
        serialize.canonicalize = _ORIGINALS.pop("canonicalize")


#: `with memoised_serde() as active:` torch.export.save/load in the block run with the memos
#: (`active`: whether they are in place)
memoised_serde = ScopedPatch(_install, _restore)
