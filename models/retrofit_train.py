"""``exitserve retrofit``: train exit heads onto a frozen, trained single-exit classifier.

The backbone (the user's factory and weights) is frozen: it runs in eval mode, so its
batch-norm statistics stay those its own training left, under ``no_grad``, and only the
heads' parameters reach the optimizer. Each head learns from the labels and from the
backbone's own answer::

    loss_k = (1 - a) * CE(z_k, y) + a * T^2 * KL(softmax(z / T) || softmax(z_k / T))

with ``z`` the backbone's logits: ``models.train.JointExitLoss`` with the last exit's
weight 0 (nothing trains the backbone). An early exit stands in for the full network on
the images it keeps, so it should learn what the full network would answer, its
confidence included, not only the label.

Every batch runs the frozen backbone again; no features are cached. Augmentation (crops,
flips, as ``exitserve train``) then shows each epoch new features, memory stays one batch,
and the cost is one backbone forward per image and epoch. Resumable: after every epoch the
checkpoint and ``OUT.resume`` (heads, optimizer, schedule, history) are written, as
``exitserve train`` does; a rerun of the same command continues.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from exitserve.models.augment import augmented_batches
from exitserve.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    ExitRecord,
    file_sha256,
    load_resume_state,
    load_weights,
    load_weights_into,
    save_checkpoint,
    save_resume_state,
)
from exitserve.models.cost import exit_costs
from exitserve.models.cut import cut_points, even_exits
from exitserve.models.data import DataSource
from exitserve.models.evaluate import exit_accuracies
from exitserve.models.metadata import ModelMetadata
from exitserve.models.preprocess import Preprocessing
from exitserve.models.registry import create_model
from exitserve.models.retrofit import Retrofit, build_backbone
from exitserve.models.train import JointExitLoss
from exitserve.models.train_config import RetrofitTrainConfig, TrainConfigError

DEFAULT_DATA = "fashion-mnist"


class Retrofitter:
    def __init__(self, cfg: RetrofitTrainConfig) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        torch.manual_seed(cfg.seed)
        backbone = build_backbone(cfg.backbone, cfg.backbone_config)
        flags = ModelMetadata(cfg.input_size, cfg.channels, cfg.mean, cfg.std, cfg.labels, cfg.data)
        meta = flags.merge(ModelMetadata.of(backbone), "the arguments", f"{cfg.backbone}'s exitserve_metadata")
        self.source = DataSource.parse(meta.dataset or DEFAULT_DATA)
        self.splits = self.source.load(meta.input_size, meta.channels)
        resolved = meta.resolve(self.splits.train, self.source.name)
        self.prep = Preprocessing(resolved.channels, resolved.input_size, resolved.mean, resolved.std)
        self.labels = resolved.labels
        names, count = cfg.exit_request()
        self.exit_points: list[dict[str, Any]] = []
        if count is not None:
            points = even_exits(cut_points(backbone, resolved.input_shape), count)
            names = [p.name for p in points]
            self.exit_points = [{"name": p.name, "flops_fraction": round(p.flops_fraction, 4)} for p in points]
        self.model: Retrofit = create_model(
            "retrofit", backbone=cfg.backbone, backbone_config=dict(cfg.backbone_config), exits=names, head=cfg.head,
            head_width=cfg.head_width, num_classes=len(self.labels), in_channels=resolved.channels,
            image_size=resolved.input_size)
        load_weights_into(self.model.backbone, load_weights(cfg.weights), cfg.weights)
        self.model.backbone.requires_grad_(False)
        self.num_heads = len(names)
        self.criterion = JointExitLoss([1.0] * self.num_heads + [0.0], cfg.distill, cfg.temperature)
        self.steps_per_epoch = min(cfg.steps_per_epoch or math.inf, len(self.splits.train) // cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise TrainConfigError(f"{len(self.splits.train)} training images make no batch of {cfg.batch_size}")
        self.optimizer = torch.optim.SGD(self.model.heads.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=True)
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        self.out = Path(cfg.out)
        self.resume_path = self.out.with_name(self.out.name + ".resume")
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0

    # -------------------------------------------------------------- resume
    def try_resume(self) -> bool:
        if not self.resume_path.exists():
            return False
        state = load_resume_state(self.resume_path)
        if state["train_config"] != asdict(self.cfg) or state["exits"] != self.model.exit_names:
            raise CheckpointError(f"{self.resume_path} was written with another configuration; delete it to start over")
        self.model.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.history, self.elapsed = state["epoch"] + 1, state["history"], state["elapsed"]
        return True

    # -------------------------------------------------------------- loop
    def train_epoch(self, epoch: int) -> float:
        cfg = self.cfg
        images = torch.from_numpy(self.splits.train.images)
        labels = torch.from_numpy(self.splits.train.labels)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(self.splits.train), generator=gen)
        padding = cfg.crop_padding if cfg.crop_padding is not None else self.prep.size // 8
        self.model.heads.train()
        self.model.backbone.eval()  # frozen: batch-norm statistics as its own training left them
        running = 0.0
        batches = augmented_batches(images, order, self.steps_per_epoch, cfg.batch_size, padding, cfg.hflip, gen)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   leave=False)
        for step, (idx, batch) in enumerate(bar):
            x = self.prep.normalize(batch)  # N x C x H x W
            with torch.no_grad():
                features, output = self.model.exit_features(x)
            logits = [head(f) for head, f in zip(self.model.heads, features)] + [output]
            loss = self.criterion(logits, labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.4f}")
        return running

    def run(self) -> Checkpoint:
        if self.try_resume():
            tqdm.write(f"resuming {self.out} after epoch {self.start_epoch}")
        shares = ", ".join(f"{p['name']} ({100 * p['flops_fraction']:.0f}% of the FLOPs)" for p in self.exit_points)
        tqdm.write(f"exits after {shares or ', '.join(self.model.exit_names)}; heads: {self.cfg.head}")
        for epoch in range(self.start_epoch, self.cfg.epochs):
            started = time.perf_counter()
            loss = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            holdout = exit_accuracies(self.model, self.splits.holdout, self.prep)
            self.elapsed += time.perf_counter() - started
            record = {"epoch": epoch + 1, "loss": loss, "train_seconds": round(train_seconds, 1), "holdout": holdout}
            self.history.append(record)
            tqdm.write(json.dumps(record))
            save_checkpoint(self.out, self._checkpoint(epoch, final=False))
            save_resume_state(self.resume_path, {
                "train_config": asdict(self.cfg), "exits": self.model.exit_names, "epoch": epoch,
                "history": self.history, "elapsed": self.elapsed, "heads": self.model.heads.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            })
        checkpoint = self._checkpoint(self.cfg.epochs - 1, final=True)
        save_checkpoint(self.out, checkpoint)
        self.resume_path.unlink(missing_ok=True)
        return checkpoint

    # -------------------------------------------------------------- output
    def _checkpoint(self, epoch: int, final: bool) -> Checkpoint:
        holdout = self.history[-1]["holdout"] if self.history else [None] * (self.num_heads + 1)
        costs = exit_costs(self.model, (self.prep.channels, self.prep.size, self.prep.size))
        test = exit_accuracies(self.model, self.splits.test, self.prep) if final else [None] * len(costs)
        return Checkpoint(
            model="retrofit",
            config=self.model.config_dict(),
            state_dict={k: v.clone() for k, v in self.model.state_dict().items()},
            labels=list(self.labels),
            preprocessing=self.prep,
            exits=[ExitRecord.from_cost(c, h, t) for c, h, t in zip(costs, holdout, test, strict=True)],
            dataset={"name": self.source.name, "train": len(self.splits.train),
                     "holdout": len(self.splits.holdout), "test": len(self.splits.test)},
            training={"config": asdict(self.cfg), "exits": self.model.exit_names, "exit_points": self.exit_points,
                      "backbone_weights": {"path": self.cfg.weights, "sha256": file_sha256(self.cfg.weights)},
                      "epochs_done": epoch + 1, "seconds": round(self.elapsed, 1), "history": self.history,
                      "torch": torch.__version__},
        )


def retrofit(cfg: RetrofitTrainConfig) -> Checkpoint:
    return Retrofitter(cfg).run()
