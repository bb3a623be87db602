"""exitserve: adaptive early-exit inference server. The console entry point lives in ``exitserve.cli``.

Serving your own model from Python (docs/design.md, "Your own model")::

    from exitserve import MultiExit, export_model

    model = MultiExit(my_resnet, exits={"layer1": head1, "layer2": head2})
    export_model(model, "model_repository/mine", mean=[0.286], std=[0.353], data="fashion-mnist")

These names import PyTorch on first use; ``import exitserve`` itself does not (the server
never imports PyTorch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {  # name -> the module defining it, imported when the name is first used
    "EarlyExitModel": "exitserve.models.early_exit",
    "ExitSpec": "exitserve.models.early_exit",
    "MultiExit": "exitserve.models.multi_exit",
    "ModelMetadata": "exitserve.models.metadata",
    "export_model": "exitserve.exporter.export",
    "register_model": "exitserve.models.registry",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'exitserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
