"""Model registry: ``create_model(name, **cfg)`` is the only way to build a model."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from torch import nn

from exitserve.errors import ExitserveError
from exitserve.models import FAMILY_MODULES

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])
Config = TypeVar("Config")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelConfigError(ExitserveError, ValueError):
    """A model config whose values the builder refuses (out of range, or changing what a
    variant fixes)."""


class UnknownModelConfigKey(ExitserveError, TypeError):
    """A model config key the builder does not take."""


class UnknownModelName(ExitserveError, KeyError):
    """A model name nothing registered."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr of it
        return str(self.args[0])


def register_model(builder: Builder) -> Builder:
    """Register a builder under its function name; a name registered twice is an error."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder


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


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def create_model(name: str, **cfg: Any) -> nn.Module:
    _load_families()
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise UnknownModelName(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
    return builder(**cfg)
