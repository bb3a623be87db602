"""ONNX Runtime sessions for a repository's stages, and running one stage.

The CUDA execution provider is used only when a session really loaded it
(``get_providers()`` after creation: ``get_available_providers()`` lists CUDA even where
its libraries are missing). With IO binding, carried tensors stay where the provider
put them (device memory on CUDA) as ``OrtValue``s; only the per-exit probabilities are
copied to the host. The binding path runs on CPU too, so tests cover it without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from exitserve.repository.format import Manifest, RepositoryError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ProviderChoice = Literal["auto", "cuda", "cpu"]
BindingChoice = Literal["auto", "on", "off"]


@dataclass
class StageOutput:
    carried: list[Any]  # numpy arrays, or OrtValues when bound
    probs: np.ndarray  # N_kept x classes, on the host
    logits: np.ndarray | None = None


def session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    return options


_cuda_failed = False  # once CUDA failed to load in this process, do not retry per session


def create_session(path: Path, provider: ProviderChoice, intra_op_threads: int | None = None) -> ort.InferenceSession:
    """A session on CUDA when asked (or 'auto') and it really loads, on CPU otherwise."""
    global _cuda_failed
    try_cuda = provider in ("auto", "cuda") and not _cuda_failed and CUDA in ort.get_available_providers()
    if try_cuda:
        ort.set_default_logger_severity(4)  # the failed-load messages are ours to report, once
        try:
            session = ort.InferenceSession(str(path), session_options(intra_op_threads), providers=[CUDA, CPU])
        except Exception as exc:  # a broken CUDA install can fail session creation itself
            log.warning("CUDA session for %s failed (%s)", path.name, exc)
        else:
            if session.get_providers()[0] == CUDA:
                return session
        finally:
            ort.set_default_logger_severity(2)
        _cuda_failed = True
        log.warning("CUDAExecutionProvider is listed but does not load here (missing CUDA/cuDNN libraries); "
                    "running on CPU")
    try:
        return ort.InferenceSession(str(path), session_options(intra_op_threads), providers=[CPU])
    except Exception as exc:  # truncated or foreign files: name the file, keep ORT's first line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RepositoryError(f"{path}: not a loadable ONNX stage ({reason})") from None


class StagedModel:
    """One ONNX Runtime session per stage of one model repository folder."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        provider: ProviderChoice = "auto",
        io_binding: BindingChoice = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.sessions = [
            create_session(folder / stage.file, provider, intra_op_threads) for stage in manifest.stages
        ]
        self.provider = self.sessions[0].get_providers()[0]
        if any(s.get_providers()[0] != self.provider for s in self.sessions):
            log.warning("stages of %s loaded on different providers; using CPU for all", manifest.name)
            self.sessions = [create_session(folder / st.file, "cpu", intra_op_threads) for st in manifest.stages]
            self.provider = CPU
        self.use_binding = io_binding == "on" or (io_binding == "auto" and self.provider == CUDA)
        self.device = "cuda" if self.provider == CUDA else "cpu"

    @property
    def num_stages(self) -> int:
        return len(self.sessions)

    def run_stage(
        self, index: int, carried: list[Any], keep: np.ndarray | None = None, want_logits: bool = False
    ) -> StageOutput:
        """Run stage ``index``. ``carried``: the image batch for stage 0, else the previous
        stage's carried outputs; ``keep``: indices (into those) of the images to continue."""
        spec = self.manifest.stages[index]
        if spec.keep_input is not None:
            if keep is None:
                keep = np.arange(_batch_of(carried[0]), dtype=np.int64)
            keep = np.ascontiguousarray(keep, dtype=np.int64)
        if self.use_binding:
            return self._run_bound(index, carried, keep, want_logits)
        feeds = dict(zip(spec.carried_inputs, carried))
        if spec.keep_input is not None:
            feeds[spec.keep_input] = keep
        names = [*spec.carried_outputs, spec.probs_output] + ([spec.logits_output] if want_logits else [])
        results = self.sessions[index].run(names, feeds)
        n = len(spec.carried_outputs)
        return StageOutput(results[:n], results[n], results[n + 1] if want_logits else None)

    def iter_stages(self, images: np.ndarray, want_logits: bool = False) -> Iterator[tuple[int, list[Any], StageOutput]]:
        """Run every stage on every image (nobody exits): yields ``(stage, its inputs, its output)``.

        The one "full depth, all exits" loop: parity, calibration and latency measurement
        consume it; the serving engine, where images leave, has its own.
        """
        carried: list[Any] = [images]
        for index in range(self.num_stages):
            out = self.run_stage(index, carried, want_logits=want_logits)
            yield index, carried, out
            carried = out.carried

    def _run_bound(self, index: int, carried: list[Any], keep: np.ndarray | None, want_logits: bool) -> StageOutput:
        spec = self.manifest.stages[index]
        session = self.sessions[index]
        binding = session.io_binding()
        for name, value in zip(spec.carried_inputs, carried):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if spec.keep_input is not None:
            binding.bind_cpu_input(spec.keep_input, keep)
        for name in spec.carried_outputs:
            binding.bind_output(name, self.device)  # stays on the device
        binding.bind_output(spec.probs_output, "cpu")
        if want_logits:
            binding.bind_output(spec.logits_output, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        n = len(spec.carried_outputs)
        logits = outputs[n + 1].numpy() if want_logits else None
        return StageOutput(list(outputs[:n]), outputs[n].numpy(), logits)


def _batch_of(value: Any) -> int:
    return int(value.shape()[0]) if isinstance(value, ort.OrtValue) else int(value.shape[0])
