"""Parity gate: ONNX Runtime stages must reproduce PyTorch's logits at every exit."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from exitserve.errors import ExitserveError
from exitserve.repository.runtime import StagedModel


class ParityError(ExitserveError, RuntimeError):
    """The exported stages disagree with PyTorch beyond tolerance."""


@dataclass
class ExitParity:
    exit: int
    max_abs_diff: float
    argmax_mismatches: int


@dataclass
class ParityReport:
    images: int
    tolerance: float
    precision: str
    exits: list[ExitParity]

    @property
    def passed(self) -> bool:
        return all(e.max_abs_diff <= self.tolerance and e.argmax_mismatches == 0 for e in self.exits)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def onnx_exit_logits(staged: StagedModel, images: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Every exit's logits through the ONNX stages (all images kept at every stage)."""
    per_batch = []
    for start in range(0, len(images), batch_size):
        stages = staged.iter_stages(images[start : start + batch_size], want_logits=True)
        per_batch.append([out.logits.astype(np.float32) for _, _, out in stages])
    return [np.concatenate(chunks) for chunks in zip(*per_batch)]


def check_parity(
    model: nn.Module, staged: StagedModel, images: np.ndarray, tolerance: float, precision: str = "fp32"
) -> ParityReport:
    """``images``: normalized float32 N x C x H x W."""
    with torch.no_grad():
        reference = [t.numpy() for t in model.eval()(torch.from_numpy(images))]
    feed = images.astype(np.float16) if precision == "fp16" else images
    exported = onnx_exit_logits(staged, feed)
    exits = [
        ExitParity(
            exit=k,
            max_abs_diff=float(np.abs(ref - got).max()),
            argmax_mismatches=int((ref.argmax(1) != got.argmax(1)).sum()),
        )
        for k, (ref, got) in enumerate(zip(reference, exported))
    ]
    return ParityReport(len(images), tolerance, precision, exits)


def require_parity(report: ParityReport) -> None:
    for e in report.exits:
        if e.max_abs_diff > report.tolerance or e.argmax_mismatches:
            raise ParityError(
                f"stage {e.exit} ({report.precision}) disagrees with PyTorch on {report.images} images: "
                f"max |logit difference| {e.max_abs_diff:.3g} (tolerance {report.tolerance:g}), "
                f"{e.argmax_mismatches} argmax mismatches"
            )
