"""Time one training step of our MSDNet against the reference implementation's, same
configuration, same batches, interleaved in one process (so machine noise hits both).

The reference code is not part of this repository; pass the path of its models/msdnet.py
(MSDNet-PyTorch, commit f654595):

    python scripts/compare_reference_speed.py /path/to/MSDNet-PyTorch/models/msdnet.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import statistics
import time
import types

import torch
import torch.nn.functional as F

from exitserve.models.registry import create_model

CONFIG = dict(nBlocks=5, stepmode="lin_grow", step=1, base=1, nChannels=16, growthRate=6, grFactor=[1, 2, 4],
              bnFactor=[1, 2, 4], nScales=3, prune="max", reduction=0.5, bottleneck=True)


def load_reference(path: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("reference_msdnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its layout
        return module.MSDNet(types.SimpleNamespace(data="cifar10", **CONFIG))


def step_ms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    started = time.perf_counter()
    loss = sum(F.cross_entropy(o, y) for o in model(x))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="path to the reference models/msdnet.py")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = create_model("msdnet", data="cifar10", num_classes=10, in_channels=3, image_size=32, **CONFIG)
    theirs = load_reference(args.reference)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    models = {"ours": ours, "reference": theirs}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.steps + 5):
        x = torch.randn(args.batch_size, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch_size,))
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for name in order:
            ms = step_ms(models[name], x, y, opts[name])
            if i >= 5:
                times[name].append(ms)
    for name, samples in times.items():
        print(f"{name:>9}: median {statistics.median(samples):7.1f} ms/step (batch {args.batch_size})")
    ratio = statistics.median(times["ours"]) / statistics.median(times["reference"])
    print(f"ours / reference: {ratio:.3f}")


if __name__ == "__main__":
    main()
