"""``MultiExit``: a plain classifier plus exit heads after named submodules, an
``EarlyExitModel`` whose stages ``torch.fx`` cuts (``models.cut``), so its author writes
no ``stages()``.

    model = MultiExit(resnet, exits={"layer1": head1, "layer2": head2})

``exits`` maps a submodule's name (as ``named_modules()`` spells it: ``layer2``,
``layer2.1``) to the head that turns that submodule's output into logits, listed in the
order ``forward`` computes them; the backbone's own output is the last exit. The cut is made
once, here, so a name that does not exist, or a backbone that cannot be traced, fails at
construction with a message naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from exitserve.models.cut import Cut, cut_at
from exitserve.models.early_exit import EarlyExitModel, ExitSpec
from exitserve.models.metadata import ATTRIBUTE, ModelMetadata


class CutStage(nn.Module):
    """Stage ``k`` of a cut backbone: its segment, then exit ``k``'s head on the segment's
    feature (the last stage's head is the identity: the backbone's output is its logits)."""

    def __init__(self, segment: nn.Module, head: nn.Module, carried_names: list[str]) -> None:
        super().__init__()
        self.segment = segment
        self.head = head
        self.carried_names = carried_names  # what it hands on, by the traced graph's names

    def forward(self, *carried: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        next_carried, feature = self.segment(*carried)
        return tuple(next_carried), self.head(feature)


class MultiExit(EarlyExitModel):
    """``backbone`` with ``exits`` (submodule name -> head); ``metadata`` (a
    :class:`~exitserve.models.metadata.ModelMetadata` or a dict of its fields) travels with
    the model into the export as its ``exitserve_metadata``."""

    def __init__(self, backbone: nn.Module, exits: Mapping[str, nn.Module], *,
                 metadata: ModelMetadata | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not exits:
            raise ValueError("MultiExit needs at least one exit besides the backbone's own output")
        self.backbone = backbone
        self.heads = nn.ModuleList(exits.values())
        self.exit_names = list(exits)
        self._cut: Cut = cut_at(backbone, self.exit_names)  # a plain object: not a submodule, no state-dict keys
        if metadata is not None:
            setattr(self, ATTRIBUTE, metadata)
            ModelMetadata.of(self)  # a bad key fails here, not at export

    def exit_specs(self) -> list[ExitSpec]:
        names = [*self.exit_names, self._cut.final_name]
        return [ExitSpec(index=i, name=name) for i, name in enumerate(names)]

    def stages(self) -> list[nn.Module]:
        heads = [*self.heads, nn.Identity()]
        return [CutStage(segment, head, carried)
                for segment, head, carried in zip(self._cut.segments, heads, self._cut.carried, strict=True)]

    def config_dict(self) -> dict[str, Any]:
        """Where the exits are; a ``MultiExit`` is built by its author's code, not the registry."""
        return {"exits": list(self.exit_names)}

    def exit_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The backbone's output at every exit (what the heads take) and its own logits:
        what retrofit trains the heads on. Features are copies, so an in-place operation
        later in the backbone (``ReLU(inplace=True)``) cannot change them."""
        carried: tuple[torch.Tensor, ...] = (x,)
        features = []
        for segment in self._cut.segments[:-1]:
            carried, feature = segment(*carried)
            features.append(feature.clone())
        _, output = self._cut.segments[-1](*carried)
        return features, output
