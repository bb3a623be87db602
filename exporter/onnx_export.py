"""Trace every stage of a multi-exit model to its own ONNX file.

A stage after the first takes one more input, ``keep`` (int64 indices of the images
still running), and gathers its carried inputs itself, so compaction of the batch
happens inside the graph, on the device. Every stage returns its carried tensors, the
exit's ``logits`` and ``probs`` (softmax): only ``probs`` needs to reach the host.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from exitserve.repository.format import DEFAULT_OPSET

OPSET = DEFAULT_OPSET
BATCH = "batch"


class ExportableStage(nn.Module):
    """Wraps a stage with in-graph compaction and a softmax output."""

    def __init__(self, stage: nn.Module, gathers: bool) -> None:
        super().__init__()
        self.stage = stage
        self.gathers = gathers

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.gathers:
            *carried, keep = inputs
            carried = [t.index_select(0, keep) for t in carried]  # N_kept x ...
        else:
            carried = list(inputs)
        next_carried, logits = self.stage(*carried)
        return (*next_carried, logits, torch.softmax(logits, dim=1))


@dataclass
class ExportedStage:
    index: int
    file: str
    carried_inputs: list[str]
    keep_input: str | None
    carried_outputs: list[str]


def export_stages(
    model: nn.Module, input_shape: tuple[int, int, int], out_dir: Path, opset: int = OPSET, fp16: bool = False
) -> list[ExportedStage]:
    """Write ``stage_XX.onnx`` for every stage; returns their input and output names."""
    model = model.eval()
    carried: tuple[torch.Tensor, ...] = (torch.zeros(2, *input_shape),)
    exported: list[ExportedStage] = []
    for index, stage in enumerate(model.stages()):
        gathers = index > 0
        carried_inputs = ["image"] if index == 0 else [f"carried_in_{i}" for i in range(len(carried))]
        with torch.no_grad():
            next_carried, _ = stage(*carried)
        carried_outputs = [f"carried_out_{i}" for i in range(len(next_carried))]
        input_names = carried_inputs + (["keep"] if gathers else [])
        output_names = carried_outputs + ["logits", "probs"]
        args = tuple(carried) + ((torch.arange(carried[0].shape[0]),) if gathers else ())
        wrapper = ExportableStage(stage, gathers).eval()  # export restores the wrapper's mode onto the model
        if fp16:
            wrapper = wrapper.half()
            args = tuple(a.half() if a.is_floating_point() else a for a in args)
        dynamic_axes = {name: {0: BATCH} for name in input_names + output_names}
        dynamic_axes.pop("keep", None)
        if gathers:
            dynamic_axes["keep"] = {0: "kept"}
        path = out_dir / f"stage_{index:02d}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        exported.append(ExportedStage(index, path.name, carried_inputs, "keep" if gathers else None, carried_outputs))
        carried = tuple(next_carried)
    return exported


class FullDepth(nn.Module):
    """The whole network as one graph, last exit only: the plain-serving baseline."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)[-1]
        return logits, torch.softmax(logits, dim=1)


FULL_MODEL_FILE = "full_model.onnx"


def export_full_model(model: nn.Module, input_shape: tuple[int, int, int], out_dir: Path, opset: int = OPSET) -> str:
    """Write ``full_model.onnx`` (input ``image``, outputs ``logits`` and ``probs``)."""
    path = out_dir / FULL_MODEL_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FullDepth(model).eval(), (torch.zeros(2, *input_shape),), str(path),
            input_names=["image"], output_names=["logits", "probs"],
            dynamic_axes={"image": {0: BATCH}, "logits": {0: BATCH}, "probs": {0: BATCH}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path.name
