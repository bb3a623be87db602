"""Model registry: ``create_model(name, **cfg)`` is the only way to build a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Builder) -> Builder:
    """Register a builder under its function name; a name registered twice is an error."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder


def _load_families() -> None:
    # importing a family module runs its @register_model decorators
    import models.msdnet  # noqa: F401
    import models.espnetv2  # noqa: F401
    import models.inception  # noqa: F401


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def create_model(name: str, **cfg: Any) -> nn.Module:
    _load_families()
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
    return builder(**cfg)
