"""Model registry: ``create_model(name, **cfg)`` is the only way to build a model.

Builders come from the families shipped here (``FAMILY_MODULES``) and from plug-ins: an
installed distribution adds families through the ``exitserve.models`` entry-point group
(timm's registry plus setuptools entry points; pytest's ``pytest11``), so a user adds a
family by installing a package, not by editing ours::

    [project.entry-points."exitserve.models"]
    tinynet = "tinynet.family"          # a module: its @register_model builders register
    tinynet_small = "tinynet.family:small"  # a builder: registered under the entry point's name

A builder takes its config's fields as keyword arguments; ``exitserve train`` also passes
``num_classes``, ``in_channels`` and ``image_size`` from the dataset. A plug-in that fails
to load, or registers a name already taken, stops the command with a message naming the
distribution: a family that silently went missing would only show much later.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from torch import nn

from exitserve.errors import ExitserveError
from exitserve.models import FAMILY_MODULES

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])
Config = TypeVar("Config")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
ENTRY_POINT_GROUP = "exitserve.models"
BUILT_IN = "built-in"
_PLUGIN_ORIGIN: dict[str, str] = {}  # module of a loaded plug-in entry point -> "distribution version"
_LOADED_ENTRY_POINTS: set[tuple[str, str]] = set()


class ModelConfigError(ExitserveError, ValueError):
    """A model config whose values the builder refuses (out of range, or changing what a
    variant fixes)."""


class UnknownModelConfigKey(ExitserveError, TypeError):
    """A model config key the builder does not take."""


class PluginError(ExitserveError, RuntimeError):
    """An ``exitserve.models`` entry point that cannot be loaded."""


class UnknownModelName(ExitserveError, KeyError):
    """A model name nothing registered."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr of it
        return str(self.args[0])


def register_model(builder: Builder) -> Builder:
    """Register a builder under its function name; a name registered twice is an error."""
    _register(builder.__name__, builder)
    return builder


def _register(name: str, builder: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered (by {_origin(_REGISTRY[name])}); "
                         f"{_origin(builder)} registers it again")
    _REGISTRY[name] = builder


def build_config(
    builder: str,
    config_type: type[Config],
    defaults: Mapping[str, Any],
    overrides: Mapping[str, Any],
    fixed: Iterable[str] = (),
) -> Config:
    """The config a builder makes: ``defaults`` updated by ``overrides``.

    A key that is not a field of ``config_type`` is an ``UnknownModelConfigKey`` (a
    ``TypeError``). Keys in ``fixed`` are what make the variant (an ImageNet builder's 1000
    classes): repeating their default is fine, because checkpoints rebuild through their own
    builder with their full config, but changing it is a ``ModelConfigError`` (a
    ``ValueError``) that names the family builder to use instead (builders are named
    ``<family>`` or ``<family>_<variant>``); so is a value the config's own checks refuse.
    """
    assert is_dataclass(config_type), config_type
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UnknownModelConfigKey(f"{builder}: unknown config keys {unknown}; known: {sorted(known)}")
    clashes = [
        f"{key}={overrides[key]!r} (this variant fixes {key}={defaults[key]!r})"
        for key in fixed
        if key in overrides and overrides[key] != defaults[key]
    ]
    if clashes:
        family = builder.partition("_")[0]
        raise ModelConfigError(f"{builder}: conflicting arguments {', '.join(clashes)}; "
                               f"use {family!r} for other values")
    try:
        return config_type(**{**defaults, **overrides})
    except ValueError as exc:  # the config's own checks (__post_init__): values a user chose
        raise ModelConfigError(f"{builder}: {exc}") from exc


def _load_families() -> None:
    # importing a family module runs its @register_model decorators
    for family in FAMILY_MODULES:
        importlib.import_module(f"exitserve.models.{family}")
    _load_plugins()


def _load_plugins() -> None:
    """Load every ``exitserve.models`` entry point not loaded yet (looked up on each call,
    so a distribution installed while the process runs is found too)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (entry.name, entry.value)
        if key in _LOADED_ENTRY_POINTS:
            continue
        dist = f"{entry.dist.name} {entry.dist.version}" if entry.dist else "an unnamed distribution"
        _PLUGIN_ORIGIN[entry.module] = dist
        try:
            loaded = entry.load()
        except Exception as exc:
            raise PluginError(f"plug-in {entry.name} = {entry.value} ({dist}, entry point group "
                              f"{ENTRY_POINT_GROUP}) failed to load: {type(exc).__name__}: {exc}") from exc
        _LOADED_ENTRY_POINTS.add(key)
        if callable(loaded) and _REGISTRY.get(entry.name) is not loaded:  # a builder, not a module
            try:
                _register(entry.name, loaded)
            except ValueError as exc:
                raise PluginError(f"plug-in {entry.name} = {entry.value} ({dist}): {exc}") from exc


def _origin(builder: Callable[..., nn.Module]) -> str:
    module = getattr(builder, "__module__", "") or ""
    if module.startswith("exitserve."):
        return BUILT_IN
    if module in _PLUGIN_ORIGIN:
        return _PLUGIN_ORIGIN[module]
    package = module.partition(".")[0]  # a builder in another module of a plug-in's package
    return next((dist for name, dist in _PLUGIN_ORIGIN.items() if name.partition(".")[0] == package),
                f"module {module}")


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def model_origins() -> dict[str, str]:
    """Every registered builder and where it comes from: ``built-in``, the plug-in's
    distribution and version, or the module that registered it at run time."""
    _load_families()
    return {name: _origin(_REGISTRY[name]) for name in sorted(_REGISTRY)}


def create_model(name: str, **cfg: Any) -> nn.Module:
    _load_families()
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise UnknownModelName(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
    return builder(**cfg)
