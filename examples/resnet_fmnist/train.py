"""An ordinary PyTorch training loop for resnet.py on Fashion-MNIST (Debian's
dataset-fashion-mnist files): nothing here knows of exitserve. Saves the state dict after
every epoch; the test-set accuracy goes to the log.

    python train.py --epochs 4 --out backbone.pt
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet import resnet18

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def idx(name: str) -> np.ndarray:
    raw = gzip.decompress((DATA / name).read_bytes())
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def tensors(images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.from_numpy(idx(images).astype(np.float32) / 255) - MEAN) / STD
    return x[:, None], torch.from_numpy(idx(labels).astype(np.int64))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random 2-pixel shifts and horizontal flips."""
    padded = nn.functional.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
    i, j = np.random.randint(0, 5, 2)
    x = padded[:, :, i:i + 28, j:j + 28]
    flip = torch.rand(len(x)) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="backbone.pt")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (ResNet-18: 64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    train_x, train_y = tensors("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test_x, test_y = tensors("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    model = resnet18(width=args.width)
    steps = args.epochs * (len(train_x) // args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        started = time.time()
        order = torch.randperm(len(train_x))
        for step in range(len(train_x) // args.batch_size):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = loss_fn(model(augment(train_x[batch])), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 100 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.3f}", flush=True)
        model.eval()
        with torch.no_grad():
            correct = sum((model(test_x[i:i + 500]).argmax(1) == test_y[i:i + 500]).sum().item()
                          for i in range(0, len(test_x), 500))
        torch.save(model.state_dict(), args.out)
        print(f"epoch {epoch}: test accuracy {correct / len(test_x):.4f} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
