"""A user's own project, written into a folder: a package called ``models`` (the name a
user picks; ours is ``exitserve.models``) holding a plain CNN that knows nothing of
exitserve, a backbone torch.fx cannot trace, an ``EarlyExitModel`` subclass that is never
registered, and a ``MultiExit`` factory; plus an ordinary training loop for the CNN.

``user_imports`` imports from such a folder the way ``exitserve`` run there does (the
folder first on ``sys.path``, as the working directory) and forgets those modules again
afterwards, so another test's folder with its own ``models`` is imported afresh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PACKAGE = "models"

NET = '''"""A plain CNN and friends, written as a user would, without exitserve in mind."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.a = Block(channels, channels, 1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.b(self.a(x)) + x)


class SmallNet(nn.Module):
    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.stem = Block(1, width, 1)
        self.layer1 = Residual(width)
        self.layer2 = Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # N x 4w x 7 x 7
        return self.fc(torch.flatten(self.pool(x), 1))


def small_net(width=8):
    return SmallNet(width)


class DataGate(nn.Module):
    """Skips its convolution for dark images: a branch on the tensor's values."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x


class GatedNet(SmallNet):
    def __init__(self):
        super().__init__()
        self.gate = DataGate(32)

    def forward(self, x):
        x = self.gate(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def untraceable():
    return GatedNet()


def not_multi_exit():
    return SmallNet()
'''

EXITS = '''"""Multi-exit models written against exitserve's interface, never registered."""

import torch
from torch import nn

from exitserve import EarlyExitModel, ExitSpec, MultiExit
from exitserve.models.early_exit import Stage

from models.net import Block, SmallNet

FMNIST = {"mean": [0.286], "std": [0.353], "dataset": "fashion-mnist"}


class TwoExitNet(EarlyExitModel):
    """Writes its own stages: an exit after the first block, then the rest."""

    exitserve_metadata = FMNIST

    def __init__(self):
        super().__init__()
        self.front = nn.Sequential(Block(1, 8, 2))
        self.back = nn.Sequential(Block(8, 16, 2))
        self.early = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.late = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def exit_specs(self):
        return [ExitSpec(0, "early"), ExitSpec(1, "late")]

    def stages(self):
        return [Stage(self.front, self.early, carries_list=False, is_last=False),
                Stage(self.back, self.late, carries_list=False, is_last=True)]

    def config_dict(self):
        return {}


def two_exit():
    torch.manual_seed(0)
    return TwoExitNet()


def pool_head(channels):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def multi_exit(width=8):
    torch.manual_seed(0)
    return MultiExit(SmallNet(width), exits={"layer1": pool_head(width), "layer2": pool_head(2 * width)},
                     metadata=FMNIST)
'''


def write_user_package(root: Path) -> Path:
    """The user's project folder: ``root/models/{__init__,net,exits}.py``."""
    package = root / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "net.py").write_text(NET)
    (package / "exits.py").write_text(EXITS)
    return root


@contextmanager
def user_imports(root: Path) -> Iterator[None]:
    """Run inside ``root`` as ``exitserve`` run there would: working directory and first
    ``sys.path`` entry; afterwards the path, the directory and ``sys.modules`` are as before."""
    import importlib

    saved_path, saved_cwd = list(sys.path), os.getcwd()
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    os.chdir(root)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                del sys.modules[name]


def train_backbone(root: Path, steps: int = 150, batch: int = 64) -> Path:
    """The user's own training loop for ``SmallNet`` (Fashion-MNIST, normalised with mean
    0.286, std 0.353); the state dict goes to ``root/small.pt``."""
    import torch
    from exitserve.models.data import load_splits

    train = load_splits("fashion-mnist").train
    rng = np.random.default_rng(0)
    with user_imports(root):
        from models.net import small_net  # the user's package

        torch.manual_seed(0)
        net = small_net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(steps):
            idx = rng.integers(0, len(train), batch)
            x = (torch.from_numpy(train.images[idx]).permute(0, 3, 1, 2).float() / 255 - 0.286) / 0.353
            loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(train.labels[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(net.state_dict(), root / "small.pt")
    return root / "small.pt"


def exitserve_cli(root: Path, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """``exitserve ARGS`` run from ``root``, as the user types it."""
    exe = Path(sys.executable).with_name("exitserve")
    return subprocess.run([str(exe), *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
