"""The backbone registry: one dict of builders, their arguments inferred from signatures.

Mammoth's `@register_backbone(name)` contract: names are normalised (lower case,
`_` == `-`), arguments come from the builder's signature, and every CLI gets an argparse group
built from that inference. Integer arguments are counts and sizes (classes, filters, depth,
width): values below 1 are refused. The registry is an object so tests can inject their own.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "ArgSpec",
    "BackboneEntry",
    "Registry",
    "REGISTRY",
    "normalise_name",
    "parse_bool",
    "register_backbone",
    "register_presets",
    "get_backbone",
    "get_entry",
    "list_backbones",
    "match_names",
]

#: Mammoth takes `num_classes` from the dataset; on our CLI it is optional with this default.
DEFAULT_NUM_CLASSES = 10


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def normalise_name(name: str) -> str:
    """Mammoth's normalisation: lower case, `_` and `-` are the same character."""
    return name.strip().lower().replace("_", "-")


def parse_bool(value: str) -> bool:
    """Parse a command-line boolean (Mammoth's `type=bool` turns '0' into True; we do not)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}: use true/false, 1/0 or yes/no")


@dataclass(frozen=True)
class ArgSpec:
    """One inferred builder argument."""

    name: str
    type: type
    default: Any = REQUIRED
    choices: Optional[Tuple[Any, ...]] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def flag(self) -> str:
        return "--" + self.name

    def describe(self) -> str:
        kind = self.type.__name__
        if self.choices:
            kind += " in {" + ",".join(map(str, self.choices)) + "}"
        return f"{self.name}: {kind} " + ("(required)" if self.required else f"= {self.default!r}")

    def convert(self, value: Any) -> Any:
        """Check (and for strings, convert) a value for this argument; one-line error otherwise."""
        if isinstance(value, str) and self.type is not str:
            try:
                value = parse_bool(value) if self.type is bool else self.type(value)
            except (ValueError, argparse.ArgumentTypeError):
                raise TypeError(
                    f"argument {self.name!r} must be {self.type.__name__}, got {value!r}"
                ) from None
        ok = isinstance(value, self.type) or (
            self.type is float and isinstance(value, int) and not isinstance(value, bool)
        )
        if self.type is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise TypeError(
                f"argument {self.name!r} must be {self.type.__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
        if self.type is int and value < 1:  # every integer argument of a backbone is a size
            raise ValueError(f"argument {self.name!r} must be a positive integer, got {value}")
        if self.choices and value not in self.choices:
            raise ValueError(
                f"argument {self.name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        return value


@dataclass(frozen=True)
class BackboneEntry:
    """A registered builder and what the registry inferred about it."""

    name: str
    builder: Callable[..., Any]
    args: Tuple[ArgSpec, ...]
    doc: str = ""
    #: values for required arguments in examples, `--all` and `python -m zoo list`
    example: Dict[str, Any] = field(default_factory=dict)
    #: export format -> why this backbone is not exported to it (e.g. a model that does not script)
    unsupported_formats: Dict[str, str] = field(default_factory=dict)

    def arg(self, name: str) -> ArgSpec:
        for spec in self.args:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def resolve_kwargs(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Validate kwargs against the inferred arguments and fill in the defaults."""
        known = {a.name for a in self.args}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"backbone {self.name!r} has no argument(s) {unknown}; "
                f"it takes: {', '.join(a.describe() for a in self.args) or 'nothing'}"
            )
        resolved: Dict[str, Any] = {}
        for spec in self.args:
            if spec.name in kwargs:
                resolved[spec.name] = spec.convert(kwargs[spec.name])
            elif spec.required:
                raise TypeError(
                    f"backbone {self.name!r} needs argument {spec.name!r} ({spec.type.__name__}); "
                    f"e.g. get_backbone({self.name!r}, {spec.name}=...) or {spec.flag} on the CLI"
                )
            else:
                resolved[spec.name] = spec.default
        return resolved


def _annotation_type(annotation: Any, default: Any) -> Tuple[type, Optional[Tuple[Any, ...]]]:
    """Type (and choices) of one parameter: annotation, else the default's type, else str."""
    if annotation is not inspect.Parameter.empty:
        origin = typing.get_origin(annotation)
        if origin is typing.Literal:
            choices = typing.get_args(annotation)
            return type(choices[0]), tuple(choices)
        if origin is typing.Union:  # Optional[int] -> int
            inner = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(inner) == 1 and isinstance(inner[0], type):
                return inner[0], None
        if isinstance(annotation, type):
            return annotation, None
    if default is not inspect.Parameter.empty and default is not None:
        return type(default), None
    return str, None


def infer_args(builder: Callable[..., Any]) -> Tuple[ArgSpec, ...]:
    """Arguments of a builder function or of a class's `__init__`: a parameter with a default is
    optional; its type is the annotation, else the default's type, else str; `Literal[...]`
    gives choices; `self` and `_names` are skipped; `num_classes` defaults to 10."""
    target = builder.__init__ if inspect.isclass(builder) else builder
    try:
        hints = typing.get_type_hints(target, include_extras=False)
    except Exception:  # unresolved forward references: fall back to the raw annotations
        hints = {}
    specs: List[ArgSpec] = []
    for param in inspect.signature(target).parameters.values():
        if param.name == "self" or param.name.startswith("_"):
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        arg_type, choices = _annotation_type(annotation, param.default)
        default = REQUIRED if param.default is inspect.Parameter.empty else param.default
        if param.name == "num_classes" and default is REQUIRED:
            default = DEFAULT_NUM_CLASSES
        specs.append(ArgSpec(param.name, arg_type, default, choices))
    return tuple(specs)


def match_names(names: Iterable[str], include: Optional[Iterable[str] | str] = None,
                exclude: Optional[Iterable[str] | str] = None) -> List[str]:
    """Sorted `names` filtered by glob patterns, as torchvision's `list_models` does."""
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    names = sorted(names)
    if include:
        pats = [normalise_name(p) for p in include]
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    if exclude:
        pats = [normalise_name(p) for p in exclude]
        names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in pats)]
    return names


@dataclass
class Registry:
    """Name -> builder. The module-level `REGISTRY` is the default; tests make their own.

    `loader`, when set, runs once before the first lookup or registration: the `zoo` package
    sets it to import its families, so importing the registry does not import torch.
    """

    entries: Dict[str, BackboneEntry] = field(default_factory=dict)
    loader: Optional[Callable[[], Any]] = field(default=None, repr=False, compare=False)

    def _load(self) -> None:
        loader, self.loader = self.loader, None  # cleared first: the families register here
        if loader is not None:
            loader()

    def register(self, name: str, example: Optional[Dict[str, Any]] = None,
                 unsupported_formats: Optional[Dict[str, str]] = None,
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register a builder function or a backbone class under `name`.

        `example` gives a value for each required argument, used in messages and `--all`;
        `unsupported_formats` names the export formats the backbone cannot have, with why.
        """
        key = normalise_name(name)

        def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
            self._load()  # a name taken by a family is refused here, not when the family loads
            if key in self.entries:
                raise ValueError(f"backbone {key!r} is already registered")
            doc = inspect.getdoc(builder) or ""
            args = infer_args(builder)
            examples = dict(example or {})
            for a in args:  # a Literal's first choice is a fine example
                if a.required and a.name not in examples and a.choices:
                    examples[a.name] = a.choices[0]
            self.entries[key] = BackboneEntry(key, builder, args, doc, examples, dict(unsupported_formats or {}))
            return builder

        return decorate

    def entry(self, name: str) -> BackboneEntry:
        self._load()
        key = normalise_name(name)
        if key not in self.entries:
            close = difflib.get_close_matches(key, list(self.entries), n=5, cutoff=0.5)
            hint = f"did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown backbone {name!r}; {hint} registered: {', '.join(sorted(self.entries))}"
                .replace(";  ", "; ")
            )
        return self.entries[key]

    def build(self, name: str, **kwargs: Any) -> Any:
        entry = self.entry(name)
        resolved = entry.resolve_kwargs(kwargs)
        net = entry.builder(**resolved)
        # Remember how it was built: error messages and export manifests name it.
        if hasattr(net, "__dict__"):
            net.registry_name = entry.name
            net.registry_kwargs = dict(resolved)
        return net

    def names(
        self, include: Optional[Iterable[str] | str] = None, exclude: Optional[Iterable[str] | str] = None
    ) -> List[str]:
        """Sorted names, filtered by glob patterns as torchvision's `list_models` does."""
        self._load()
        return match_names(self.entries, include, exclude)

    def add_argparse_group(
        self, parser: argparse.ArgumentParser, name: str, required: bool = True,
        only_given: bool = False,
    ) -> argparse._ArgumentGroup:
        """Add `--arg` options for the backbone's inferred arguments to `parser`.

        With `required=False`, required backbone arguments are optional on the parser (for CLIs
        that can fill them from elsewhere, e.g. a checkpoint) and must be checked later. With
        `only_given=True` the namespace holds only the arguments given on the command line
        (argparse.SUPPRESS defaults, abbreviations included), so a CLI can tell given from default.
        """
        entry = self.entry(name)
        group = parser.add_argument_group(f"arguments of backbone {entry.name!r}")
        for spec in entry.args:
            kwargs: Dict[str, Any] = {"dest": spec.name, "metavar": spec.type.__name__.upper()}
            kwargs["type"] = parse_bool if spec.type is bool else spec.type
            if spec.choices:
                kwargs["choices"] = list(spec.choices)
                kwargs.pop("metavar")
            if spec.required:
                kwargs["required"] = required
                kwargs["default"] = None
                kwargs["help"] = f"{spec.type.__name__}, required"
            else:
                kwargs["default"] = spec.default
                kwargs["help"] = f"{spec.type.__name__}, default: {spec.default!r}"
            if only_given:
                kwargs["default"] = argparse.SUPPRESS
            group.add_argument(spec.flag, **kwargs)
        return group


REGISTRY = Registry()


def register_backbone(name: str, example: Optional[Dict[str, Any]] = None,
                      unsupported_formats: Optional[Dict[str, str]] = None,
                      ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builder (function or `MammothBackbone` subclass) in the default registry."""
    return REGISTRY.register(name, example, unsupported_formats)


def register_presets(presets: Dict[str, str], build: Callable[[str, int, str, str], Any], doc: str,
                     unsupported_formats: Optional[Dict[str, str]] = None) -> None:
    """Register each `name -> model` of a model family (torchvision's, timm's) as a builder taking
    `num_classes` and `weights`, made by `build(model, num_classes, weights, name)`; `doc` is
    formatted with `model`."""
    for name, model in presets.items():
        def builder(num_classes: int = DEFAULT_NUM_CLASSES, weights: str = "", _model: str = model,
                    _name: str = name) -> Any:
            return build(_model, num_classes, weights, _name)

        builder.__doc__ = doc.format(model=model)
        register_backbone(name, unsupported_formats=unsupported_formats)(builder)


def get_entry(name: str) -> BackboneEntry:
    """The registry entry (builder and inferred arguments) of a backbone name."""
    return REGISTRY.entry(name)


def get_backbone(name: str, **kwargs: Any) -> Any:
    """Build a registered backbone (a `MammothBackbone`).

    Args:
        name: a registered name (`python -m zoo list`); `_` and `-` and case do not matter.
        **kwargs: the backbone's own arguments, checked against its signature (unknown ones,
            wrong types and non-positive sizes are refused; required ones must be given).
    Raises:
        KeyError: unknown name (the message lists the closest registered ones).
        TypeError, ValueError: bad arguments, in one line.
    """
    return REGISTRY.build(name, **kwargs)


def list_backbones(
    include: Optional[Sequence[str] | str] = None, exclude: Optional[Sequence[str] | str] = None
) -> List[str]:
    """Registered names, optionally filtered by glob patterns (`'resnet*'`)."""
    return REGISTRY.names(include, exclude)
