"""timm-style registries of attacks, defenses and datasets.

A plugin is a class decorated with ``@register_attack("name")`` (or ``register_defense`` /
``register_dataset``) that declares its parameters as a dataclass in the class attribute
``Params``. Built-in plugins live in ``poisonbench.attacks`` / ``.defenses`` / ``.datasets``;
installed third-party plugins are found through the entry-point groups ``poisonbench.attacks``,
``poisonbench.defenses`` and ``poisonbench.datasets`` (each entry point names a module to import).

Every registered plugin is tested by tests/test_conformance.py (parameters, determinism, one cell
end to end on the ``tiny`` profile). A plugin may declare the parameters those tests use as a
class attribute ``test_params`` (a dict of parameter -> value applied over the profile's
defaults, e.g. ``test_params = {"n_poison": 30}`` so that the tiny data holds the poison);
without it the tests use the defaults.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from importlib.metadata import entry_points
from typing import Any, Callable


class RegistryError(ValueError):
    """An unknown plugin name or parameter, or a parameter value of the wrong type."""


class Registry:
    """Name -> plugin class map for one kind of plugin ("attack", "defense", "dataset").

    Look-ups import the built-in module package and the entry-point group first, so
    ``get``/``names`` see every plugin without the caller importing anything.
    """

    def __init__(self, kind: str, builtin_package: str, group: str):
        self.kind = kind
        self._builtin = builtin_package
        self._group = group
        self._items: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator adding ``cls`` under ``name``; raises RegistryError on a duplicate name."""

        def deco(cls: type) -> type:
            if name in self._items and self._items[name] is not cls:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
                raise RegistryError(f"{self.kind} {name!r}: class {cls.__name__} needs a dataclass attribute `Params`")
            cls.name = name
            self._items[name] = cls
            return cls

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin)
        for ep in entry_points(group=self._group):
            ep.load()

    def names(self) -> list[str]:
        """Sorted names of every registered plugin."""
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> type:
        """The plugin class registered as ``name``; RegistryError listing the valid names otherwise."""
        self._load()
        if name not in self._items:
            raise RegistryError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self._items[name]

    def params(self, name: str, overrides: dict[str, Any] | None = None):
        """Instantiate ``name``'s Params dataclass from its defaults and ``overrides``.

        Overrides may be strings (from the command line); they are converted to the field type.
        Raises RegistryError for an unknown parameter (listing the valid ones) or a bad value.
        """
        cls = self.get(name)
        return build_params(cls.Params, overrides or {}, f"{self.kind} {name!r}")


def param(default: Any, help: str) -> Any:
    """A Params dataclass field with a default and a one-line description shown by ``bench list``."""
    return dataclasses.field(default=default, metadata={"help": help})


def param_fields(params_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type name, default, help) for each field of a Params dataclass."""
    hints = typing.get_type_hints(params_cls)
    out = []
    for f in dataclasses.fields(params_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + " | None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_params(params_cls: type, overrides: dict[str, Any], what: str):
    hints = typing.get_type_hints(params_cls)
    valid = [f.name for f in dataclasses.fields(params_cls)]
    kwargs = {}
    for key, value in overrides.items():
        if key not in valid:
            raise RegistryError(f"{what} has no parameter {key!r}; valid parameters: {', '.join(valid) or '(none)'}")
        try:
            kwargs[key] = _convert(value, hints[key])
        except (TypeError, ValueError) as e:
            raise RegistryError(f"{what}: bad value {value!r} for {key} ({_type_name(hints[key])}): {e}") from None
    try:
        params = params_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{what}: {e}") from None
    return params


def _convert(value: Any, tp: Any) -> Any:
    """Convert a command-line string to the annotated type (int, float, bool, str, Optional[...], Literal)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(value, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"choose one of {', '.join(map(str, args))}")
        return value
    if not isinstance(value, str):
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return float(value)
        if isinstance(value, tp):
            return value
        raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__}")
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is float:
        x = float(value)
        if not math.isfinite(x):
            raise ValueError("expected a finite number")
        return x
    if tp in (int, str):
        return tp(value)
    raise TypeError(f"cannot parse a {_type_name(tp)} from the command line")


ATTACKS = Registry("attack", "poisonbench.attacks", "poisonbench.attacks")
DEFENSES = Registry("defense", "poisonbench.defenses", "poisonbench.defenses")
DATASETS = Registry("dataset", "poisonbench.datasets", "poisonbench.datasets")

register_attack = ATTACKS.register
register_defense = DEFENSES.register
register_dataset = DATASETS.register


def list_attacks() -> list[str]:
    """Names of all registered attacks."""
    return ATTACKS.names()


def list_defenses() -> list[str]:
    """Names of all registered defenses."""
    return DEFENSES.names()


def list_datasets() -> list[str]:
    """Names of all registered datasets."""
    return DATASETS.names()


def get_attack(name: str) -> type:
    """The attack class registered as ``name``; RegistryError listing the valid names otherwise."""
    return ATTACKS.get(name)


def get_defense(name: str) -> type:
    """The defense class registered as ``name``; RegistryError listing the valid names otherwise."""
    return DEFENSES.get(name)


def get_dataset(name: str) -> type:
    """The dataset class registered as ``name``; RegistryError listing the valid names otherwise."""
    return DATASETS.get(name)
