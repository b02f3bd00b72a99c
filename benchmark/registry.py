"""timm-style registries of attacks, defenses and datasets.

A plugin is a class decorated with ``@register_attack("name")`` (or ``register_defense`` /
``register_dataset``) that declares its parameters as a dataclass in the class attribute
``Params``. Built-in plugins live in the modules that ``poisonbench.attacks`` / ``.defenses`` /
``.datasets`` list in their ``BUILTIN_MODULES``; installed third-party plugins are found through
the entry-point groups ``poisonbench.attacks``, ``poisonbench.defenses`` and
``poisonbench.datasets`` (each entry point names a module to import).

A third-party entry point whose module fails to import does not break the tool: it is recorded
(``Registry.broken``), ``bench list`` shows it with its error, and asking for it by name raises a
RegistryError naming the module and the error. A built-in module that fails to import is a bug
in the package and raises.

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
import sys
import types
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable


class RegistryError(ValueError):
    """An unknown plugin name or parameter, a plugin whose module failed to import, or a
    parameter value of the wrong type."""


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed entry point whose module could not be imported.

    Attributes:
        name: the entry point's name (usually the plugin's name).
        module: what the entry point names (``module`` or ``module:attr``).
        error: ``"ExceptionType: message"`` raised while importing it.
        dist: the distribution that declares the entry point ("" when unknown).
    """

    name: str
    module: str
    error: str
    dist: str = ""

    def describe(self) -> str:
        """One line naming the entry point, its module, its distribution and the error."""
        by = f" (installed by {self.dist})" if self.dist else ""
        return f"{self.name} -> module {self.module}{by} failed to import: {self.error}"


class Registry:
    """Name -> plugin class map for one kind of plugin ("attack", "defense", "dataset").

    Look-ups first import the built-in modules (``BUILTIN_MODULES`` of ``builtin_package``) and
    the entry points of ``group``, so ``get``/``names`` see every plugin without the caller
    importing anything. Entry points that fail to import are kept in ``broken()``.
    """

    def __init__(self, kind: str, builtin_package: str, group: str):
        self.kind = kind
        self._builtin = builtin_package
        self._group = group
        self._items: dict[str, type] = {}
        self._broken: dict[str, BrokenPlugin] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator adding ``cls`` under ``name``; raises RegistryError on a duplicate name."""

        def deco(cls: type) -> type:
            if name in self._items and self._items[name] is not cls:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            if not dataclasses.is_dataclass(getattr(cls, "Params", None)):
                raise RegistryError(f"{self.kind} {name!r}: class {cls.__name__} needs a dataclass attribute `Params`")
            check_defaults(cls.Params, f"{self.kind} {name!r}")
            cls.name = name
            self._items[name] = cls
            return cls

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self._builtin)
        for module in package.BUILTIN_MODULES:
            importlib.import_module(f"{self._builtin}.{module}")  # a broken built-in is a bug: it raises
        for ep in entry_points(group=self._group):
            before = set(self._items)
            try:
                ep.load()
            except KeyboardInterrupt:  # a real Ctrl-C goes on; say where it struck, in case the plugin raised it
                print(f"interrupted while importing the {self.kind} plugin entry point {ep.name} -> {ep.value}",
                      file=sys.stderr)
                raise
            # any failure of a third-party module is reported, not fatal; SystemExit too (a module calling
            # sys.exit on import would otherwise end every command silently, with exit status 0)
            except (Exception, SystemExit) as e:  # noqa: BLE001
                for name in set(self._items) - before:  # what it registered before failing is not usable
                    del self._items[name]
                dist = getattr(getattr(ep, "dist", None), "name", "") or ""
                error = f"{type(e).__name__}: {e}" if str(e) else repr(e)
                self._broken[ep.name] = BrokenPlugin(ep.name, ep.value, error, dist)

    def names(self) -> list[str]:
        """Sorted names of every registered plugin (not those of ``broken()`` entry points)."""
        self._load()
        return sorted(self._items)

    def broken(self) -> list[BrokenPlugin]:
        """The entry points of this registry's group whose module failed to import, by name."""
        self._load()
        return [self._broken[n] for n in sorted(self._broken)]

    def get(self, name: str) -> type:
        """The plugin class registered as ``name``.

        Raises RegistryError naming the module and its import error when ``name`` is an entry
        point that failed to import, or listing the valid names (and any entry points that failed
        to import) for an unknown name."""
        self._load()
        if name in self._items:
            return self._items[name]
        if name in self._broken:
            raise RegistryError(f"{self.kind} {name!r} cannot be used: entry point {self._broken[name].describe()}; "
                                "fix or uninstall the plugin")
        broken = "".join(f"; entry point {b.describe()}" for b in self.broken())
        raise RegistryError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}{broken}")

    def params(self, name: str, overrides: dict[str, Any] | None = None):
        """Instantiate ``name``'s Params dataclass from its defaults and ``overrides``.

        Overrides may be strings (from the command line); they are converted to the field type.
        Raises RegistryError for an unknown parameter (listing the valid ones) or a bad value.
        """
        cls = self.get(name)
        return build_params(cls.Params, overrides or {}, f"{self.kind} {name!r}")


def param(default: Any, help: str, hash_default: bool = True) -> Any:
    """A Params dataclass field with a default and a one-line description shown by ``bench list``.

    A parameter with a fixed set of values is annotated ``typing.Literal["a", "b"]``: the registry
    refuses any other value (from the command line, a profile or a stored config) before a plugin
    is built, refuses a default outside the set at registration, and ``bench list`` shows the
    choices. ``Literal`` values are the plain strings, so ``dataclasses.asdict`` (and the run id)
    is the same as with ``str``. Choices of other types work too (``Literal[3, 4, 5]``): a
    command-line string equal to ``str(choice)`` ("3") becomes that choice (the int 3).

    When a run id changes: the run id hashes every parameter of the cell's plugins
    (``RunConfig.to_dict``), so adding a parameter to a plugin re-keys all of its cells (their
    finished results no longer count as done), even at a default that keeps the old behaviour.
    A parameter added to an existing plugin should therefore say ``hash_default=False``: it then
    enters the hashed config only when it departs from ``default``, so the cells that leave it
    alone keep their run ids and results. (The parameters a plugin was released with are hashed
    always; changing ``hash_default`` of one of them re-keys the cells at its default.)
    """
    return dataclasses.field(default=default, metadata={"help": help, "hash_default": hash_default})


def unhashed_defaults(params_cls: type) -> dict[str, Any]:
    """name -> default of the fields of a Params dataclass declared with ``hash_default=False``
    (see ``param``): those leave the hashed config while they equal this default."""
    return {f.name: f.default for f in dataclasses.fields(params_cls)
            if f.metadata.get("hash_default", True) is False and f.default is not dataclasses.MISSING}


def check_defaults(params_cls: type, what: str) -> None:
    """RegistryError when a field of a Params dataclass has no default (a plugin is built from its
    defaults and the given overrides, and ``bench list`` shows every default), or a ``Literal``
    field has a default outside its choices (so a plugin cannot ship a value it would refuse).
    Checked at registration: a third-party plugin failing it is reported as a broken plugin."""
    hints = typing.get_type_hints(params_cls)
    for f in dataclasses.fields(params_cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RegistryError(f"{what}: parameter {f.name} has no default; every parameter needs one "
                                f"(declare it with registry.param(default, help))")
        if f.default is dataclasses.MISSING or not _literals(hints[f.name]):
            continue
        try:
            _convert(f.default, hints[f.name])
        except (TypeError, ValueError) as e:
            raise RegistryError(f"{what}: the default {f.default!r} of {f.name} is not valid: {e}") from None


def _literals(tp: Any) -> bool:
    """True when ``tp`` is a Literal or an Optional Literal."""
    if typing.get_origin(tp) is typing.Literal:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(_literals(a) for a in typing.get_args(tp))


def param_fields(params_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type name, default, help) for each field of a Params dataclass; the type name of a
    ``Literal`` lists its choices, e.g. ``{random, top-left}``."""
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
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ", ".join(map(str, typing.get_args(tp))) + "}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_params(params_cls: type, overrides: dict[str, Any], what: str):
    """Instantiate ``params_cls`` from its defaults and ``overrides`` (name -> value, command-line
    strings converted to the field types; ``Literal`` values checked against their choices).
    ``what`` names the plugin in errors. Raises RegistryError for an unknown name or a bad value."""
    hints = typing.get_type_hints(params_cls)
    valid = [f.name for f in dataclasses.fields(params_cls)]
    kwargs = {}
    for key, value in overrides.items():
        if key not in valid:
            raise RegistryError(f"{what} has no parameter {key!r}; valid parameters: {', '.join(valid) or '(none)'}")
        try:
            kwargs[key] = _convert(value, hints[key])
        except (TypeError, ValueError) as e:
            kind = "" if _literals(hints[key]) else f" ({_type_name(hints[key])})"  # the choices are in e
            raise RegistryError(f"{what}: bad value {value!r} for {key}{kind}: {e}") from None
    try:
        params = params_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{what}: {e}") from None
    return params


def _convert(value: Any, tp: Any) -> Any:
    """Convert a command-line string to the annotated type (int, float, bool, str, Optional[...],
    Literal: a choice, or a string equal to ``str`` of a non-string choice, which gives the choice)."""
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
        if value in args:
            return value
        if isinstance(value, str):  # from the command line: "3" is the choice 3 of Literal[3, 4, 5]
            for a in args:
                if not isinstance(a, str) and value == str(a):
                    return a
        raise ValueError(f"choose one of {', '.join(map(str, args))}")
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
