"""A user's own code, named as ``PACKAGE.MODULE:FUNCTION`` (``--model``, ``--backbone``).

The working directory goes first on ``sys.path``, as for ``python -m``: a user runs
``exitserve`` from their project and names their own modules, whatever they are called
(a package called ``models`` is theirs; ours is ``exitserve.models``). A retrofit
checkpoint records the name, not the code, so the same module must import where the
checkpoint is exported: from the same directory, or an installed package.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from exitserve.errors import ConfigurationError


def import_object(spec: str, option: str = "--model") -> Any:
    """``package.module:attribute`` -> the attribute (dots after the colon walk attributes)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigurationError(f"{option} {spec!r}: expected PACKAGE.MODULE:FUNCTION, e.g. mynet.model:build")
    cwd = os.getcwd()
    if sys.path[:1] not in ([cwd], [""]):  # first, so the user's `models` is found before any other
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise  # a module the user's code imports is missing: its own message says which
        raise ConfigurationError(f"{option} {spec!r}: no module {exc.name!r} in the working directory {cwd} "
                                 "or the installed packages") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{option} {spec!r}: {module_name} has no attribute {attribute!r}") from None
    if not callable(obj):
        raise ConfigurationError(f"{option} {spec!r} is a {type(obj).__name__}, not a function to call")
    return obj
