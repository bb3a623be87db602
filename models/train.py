"""Multi-exit training: joint loss over every exit, optional distillation from the last.

Loss = sum_k w_k * [(1 - a) * CE(z_k, y) + a * T^2 * KL(softmax(z_last / T) || softmax(z_k / T))]
for the early exits (a = ``distill``) and w_last * CE(z_last, y) for the last. SGD with
Nesterov momentum and a per-step cosine schedule; an exponential moving average of the
weights is evaluated beside the raw weights and the better one (held-out) is released.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from exitserve.models.augment import augmented_batches, random_erasing
from exitserve.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    ExitRecord,
    file_sha256,
    load_checkpoint,
    load_resume_state,
    save_checkpoint,
    save_resume_state,
)
from exitserve.models.cost import exit_costs
from exitserve.models.data import DataSplits, load_splits
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.evaluate import exit_accuracies
from exitserve.models.preprocess import Preprocessing
from exitserve.models.registry import ModelConfigError, create_model
from exitserve.models.train_config import TrainConfig, TrainConfigError


AverageFn = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]


def ema_average_fn(decay: float, warmup: bool) -> AverageFn:
    """The weight average's update for ``AveragedModel``.

    Plain EMA starts from the weights after the first step, nearly random: at decay 0.999
    they are still 42% of the average after an 860-step epoch, and the average read at
    chance for two or three epochs of ESPNetv2. ``warmup`` uses timm's schedule,
    decay min(``decay``, (1 + t) / (10 + t)) at update t, so the average follows the model
    closely at first and reaches ``decay`` after about 9,000 updates. Off by default so
    the README's training commands reproduce the committed weights.
    """
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        t = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + t) / (10.0 + t))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (BatchNorm's step count) cannot lerp
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


class JointExitLoss(nn.Module):
    def __init__(self, weights: list[float], distill: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 <= distill <= 1.0:
            raise TrainConfigError(f"distill must be in [0, 1], got {distill}")
        self.weights = weights
        self.distill = distill
        self.temperature = temperature

    def forward(self, logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(logits) != len(self.weights):
            raise ValueError(f"{len(logits)} exits but {len(self.weights)} exit weights")
        final = logits[-1]
        loss = self.weights[-1] * F.cross_entropy(final, target)
        if self.distill > 0:
            t = self.temperature
            teacher = F.softmax(final.detach() / t, dim=1)
        for w, z in zip(self.weights[:-1], logits[:-1]):
            term = F.cross_entropy(z, target)
            if self.distill > 0:
                kd = F.kl_div(F.log_softmax(z / t, dim=1), teacher, reduction="batchmean") * t * t
                term = (1 - self.distill) * term + self.distill * kd
            loss = loss + w * term
        return loss


def build_model(cfg: TrainConfig, splits: DataSplits) -> EarlyExitModel:
    data_fields = dict(
        num_classes=len(splits.train.classes),
        in_channels=splits.train.channels,
        image_size=splits.train.size,
    )
    if cfg.model == "msdnet":
        data_fields["data"] = splits.name
    clash = {k for k in data_fields if k in cfg.model_config and cfg.model_config[k] != data_fields[k]}
    if clash:
        raise ModelConfigError(f"model config {sorted(clash)} conflicts with dataset {splits.name!r}")
    model = create_model(cfg.model, **{**cfg.model_config, **data_fields})
    if not isinstance(model, EarlyExitModel):
        raise TypeError(f"{cfg.model} does not implement the early-exit interface")
    return model


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        torch.manual_seed(cfg.seed)
        self.splits = load_splits(cfg.dataset, cfg.data_dir)
        mean, std = self.splits.train.mean_std()
        self.prep = Preprocessing(self.splits.train.channels, self.splits.train.size, mean, std)
        self.model = build_model(cfg, self.splits)
        self.parent = self._load_parent(cfg.init_from) if cfg.init_from else None
        self.num_exits = len(self.model.exit_specs())
        weights = cfg.exit_weights or [1.0] * self.num_exits
        if len(weights) != self.num_exits:  # found here, not at the first batch
            raise TrainConfigError(f"{len(weights)} exit weights for {cfg.model}'s {self.num_exits} exits")
        self.criterion = JointExitLoss(list(weights), cfg.distill, cfg.temperature)
        self.steps_per_epoch = cfg.steps_per_epoch or len(self.splits.train) // cfg.batch_size
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=ema_average_fn(cfg.ema_decay, cfg.ema_warmup), use_buffers=True)
            if cfg.ema_decay > 0
            else None
        )
        self.out = Path(cfg.out)
        self.resume_path = self.out.with_name(self.out.name + ".resume")
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0

    def _load_parent(self, path: str) -> dict[str, Any]:
        """Load another checkpoint's weights; it must be the same model with the same config."""
        parent = load_checkpoint(path)
        if parent.model != self.cfg.model or parent.config != self.model.config_dict():
            raise CheckpointError(f"{path} holds {parent.model} with another configuration; cannot start from it")
        self.model.load_state_dict(parent.state_dict, strict=True)
        return {"path": str(path), "sha256": file_sha256(path), "training": parent.training}

    # -------------------------------------------------------------- resume
    def try_resume(self) -> bool:
        if not self.resume_path.exists():
            return False
        state = load_resume_state(self.resume_path)
        if state["train_config"] != asdict(self.cfg):
            raise CheckpointError(f"{self.resume_path} was written with another configuration; "
                                  "delete it to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = state["epoch"] + 1
        self.history = state["history"]
        self.elapsed = state["elapsed"]
        return True

    # -------------------------------------------------------------- loop
    def _batches(self, epoch: int) -> tuple[torch.Generator, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(self.splits.train), generator=gen)
        return gen, order

    def train_epoch(self, epoch: int) -> float:
        cfg = self.cfg
        images = torch.from_numpy(self.splits.train.images)
        labels = torch.from_numpy(self.splits.train.labels)
        gen, order = self._batches(epoch)
        padding = cfg.crop_padding if cfg.crop_padding is not None else self.prep.size // 8
        self.model.train()
        running = 0.0
        batches = augmented_batches(images, order, self.steps_per_epoch, cfg.batch_size, padding, cfg.hflip, gen)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   leave=False)
        for step, (idx, batch) in enumerate(bar):
            x = random_erasing(self.prep.normalize(batch), cfg.erasing, gen)  # N x C x H x W
            loss = self.criterion(self.model(x), labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.4f}")
        return running

    def candidates(self) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"raw": self.model}
        if self.ema is not None:
            models["ema"] = self.ema.module
        return models

    def run(self) -> Checkpoint:
        resumed = self.try_resume()
        if resumed:
            tqdm.write(f"resuming {self.out} after epoch {self.start_epoch}")
        for epoch in range(self.start_epoch, self.cfg.epochs):
            started = time.perf_counter()
            loss = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            holdout = {
                name: exit_accuracies(m, self.splits.holdout, self.prep) for name, m in self.candidates().items()
            }
            self.elapsed += time.perf_counter() - started
            record = {"epoch": epoch + 1, "loss": loss, "train_seconds": round(train_seconds, 1), "holdout": holdout}
            self.history.append(record)
            tqdm.write(json.dumps(record))
            self._save(epoch)
        return self.release()

    # -------------------------------------------------------------- output
    def _best_candidate(self) -> tuple[str, nn.Module, list[float]]:
        last = self.history[-1]["holdout"]
        name = max(last, key=lambda k: (np.mean(last[k]), last[k][-1]))
        return name, self.candidates()[name], last[name]

    def _checkpoint(self, epoch: int, final: bool) -> Checkpoint:
        name, model, holdout_acc = self._best_candidate()
        costs = exit_costs(self.model, (self.prep.channels, self.prep.size, self.prep.size))
        test_acc = exit_accuracies(model, self.splits.test, self.prep) if final else [None] * self.num_exits
        return Checkpoint(
            model=self.cfg.model,
            config=self.model.config_dict(),
            state_dict=copy.deepcopy(model.state_dict()),
            labels=self.splits.train.classes,
            preprocessing=self.prep,
            exits=[ExitRecord.from_cost(c, h, t) for c, h, t in zip(costs, holdout_acc, test_acc)],
            dataset={"name": self.splits.name, "train": len(self.splits.train),
                     "holdout": len(self.splits.holdout), "test": len(self.splits.test)},
            training={"config": asdict(self.cfg), "epochs_done": epoch + 1, "weights": name,
                      "seconds": round(self.elapsed, 1), "history": self.history, "torch": torch.__version__,
                      "parent": self.parent},
        )

    def _save(self, epoch: int) -> None:
        save_checkpoint(self.out, self._checkpoint(epoch, final=False))
        state = {
            "train_config": asdict(self.cfg), "epoch": epoch, "history": self.history, "elapsed": self.elapsed,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
        }
        save_resume_state(self.resume_path, state)

    def release(self) -> Checkpoint:
        """Write the final checkpoint with test accuracy; the resume file is then dropped."""
        checkpoint = self._checkpoint(self.cfg.epochs - 1, final=True)
        save_checkpoint(self.out, checkpoint)
        self.resume_path.unlink(missing_ok=True)
        return checkpoint


def train(cfg: TrainConfig) -> Checkpoint:
    return Trainer(cfg).run()
