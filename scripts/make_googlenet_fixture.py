"""Write ``tests/data/googlenet_reference.pt``: torchvision GoogLeNet logits on seeded weights.

torchvision is not a dependency and 26 MB of weights do not belong in the repository, so
the fixture holds only the reference's state-dict keys and shapes, the seeds, and the
logits the reference computes for two seeded 224x224 images. The test regenerates the
same weights with ``seeded_state_dict`` (this file is imported by the test for it), loads
them strictly into ``googlenet_imagenet()`` and compares every exit.

The reference code is not part of this repository; pass the path of torchvision's
``torchvision/models/googlenet.py`` (any version; only its class definitions are run, so
torchvision itself need not be installed):

    python scripts/make_googlenet_fixture.py /path/to/vision/torchvision/models/googlenet.py

Exits compared: ``fc`` is the reference in eval mode. torchvision computes the auxiliary
heads only in training mode, where dropout is random and BN uses batch statistics; the
reference ``aux1``/``aux2`` logits are therefore torchvision's own ``InceptionAux`` modules
run in eval mode (no dropout) on the inception4a / inception4d outputs of the eval-mode
trunk, which is what our auxiliary exits compute.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.seeded_weights import seeded_state_dict  # noqa: E402  (shared with the test)

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "googlenet_reference.pt"
FORMAT = "googlenet-reference/1"
WEIGHT_SEED = 1409_4842  # the paper's arXiv number
INPUT_SEED = 2014
INPUT_SHAPE = (2, 3, 224, 224)
_CLASSES = ("GoogLeNet", "Inception", "InceptionAux", "BasicConv2d")


def seeded_input(seed: int = INPUT_SEED, shape: tuple[int, ...] = INPUT_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def load_reference_classes(path: Path) -> dict[str, Any]:
    """Exec only the absolute imports, the output namedtuple and the four classes of
    torchvision's googlenet.py (its relative imports need the rest of torchvision)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    kept: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0):
            kept.append(node)
        elif isinstance(node, ast.ClassDef) and node.name in _CLASSES:
            kept.append(node)
        elif isinstance(node, ast.Assign) and "GoogLeNetOutputs" in ast.unparse(node.targets[0]):
            kept.append(node)
    namespace: dict[str, Any] = {"_log_api_usage_once": lambda *args, **kwargs: None}
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def build_reference(path: Path, transform_input: bool = False) -> nn.Module:
    classes = load_reference_classes(path)
    return classes["GoogLeNet"](num_classes=1000, aux_logits=True, transform_input=transform_input, init_weights=False)


@torch.no_grad()
def reference_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Main logits in eval mode; aux logits from torchvision's own aux heads (eval mode)."""
    model.eval()
    features: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, out, name=name: features.__setitem__(name, out.clone()))
        for name in ("inception4a", "inception4d")
    ]
    try:
        fc = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {"aux1": model.aux1(features["inception4a"]), "aux2": model.aux2(features["inception4d"]), "fc": fc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("googlenet_py", type=Path, help="torchvision/models/googlenet.py")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()

    reference = build_reference(args.googlenet_py)
    key_shapes = [(k, list(v.shape)) for k, v in reference.state_dict().items()]
    state = seeded_state_dict(key_shapes, WEIGHT_SEED)
    reference.load_state_dict(state, strict=True)
    x = seeded_input()
    logits = reference_logits(reference, x)

    transformed = build_reference(args.googlenet_py, transform_input=True)
    transformed.load_state_dict(state, strict=True)
    with torch.no_grad():
        fc_transform_input = transformed.eval()(x)

    params_with_aux = sum(p.numel() for p in reference.parameters())
    params_without_aux = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("aux"))
    fixture = {
        "format": FORMAT,
        "source": {
            "file": "torchvision/models/googlenet.py",
            "sha256": hashlib.sha256(args.googlenet_py.read_bytes()).hexdigest(),
            "torch": str(torch.__version__),
        },
        "key_shapes": key_shapes,
        "weight_seed": WEIGHT_SEED,
        "input_seed": INPUT_SEED,
        "input_shape": list(INPUT_SHAPE),
        "params_with_aux": params_with_aux,
        "params_without_aux": params_without_aux,
        "logits": {k: v.clone() for k, v in logits.items()},
        "fc_transform_input": fc_transform_input.clone(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(key_shapes)} keys, "
          f"{params_without_aux:,} parameters without aux heads, {params_with_aux:,} with them")


if __name__ == "__main__":
    main()
