"""The models being served, by name: what the routes look models up in, and what the data
plane runs them with."""

from __future__ import annotations

from dataclasses import dataclass

from exitserve.repository.format import ServingConfig
from exitserve.server.admission import AdmissionLine
from exitserve.server.batcher import DynamicBatcher
from exitserve.server.engine import ModelEngine
from exitserve.server.errors import NotReady, UnknownModel
from exitserve.server.state import ServerState


@dataclass
class ServedModel:
    """One model: its engine, its serving.json, and (once serving) its batcher and, with a
    latency objective, its admission line."""

    engine: ModelEngine
    serving: ServingConfig
    max_pixels: int  # the largest decoded image it accepts (width x height)
    batcher: DynamicBatcher | None = None
    line: AdmissionLine | None = None

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def queue(self) -> DynamicBatcher:
        if self.batcher is None:
            raise NotReady(f"{self.name} is not serving yet")
        return self.batcher


class ModelCatalog:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None

    def serve(self, models: dict[str, ServedModel], default: str) -> None:
        self.models = models
        self.default = default

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def get(self, name: str | None) -> ServedModel:
        """The model ``name`` (the default when None); ``NotReady`` while loading or after a
        failed load, ``UnknownModel`` for a name the repository does not hold."""
        if not self.state.ready:
            raise NotReady(self.state.load_error or "models are still loading")
        key = name or self.default
        if key not in self.models:
            raise UnknownModel(f"no model {key!r}; serving: {', '.join(sorted(self.models))}")
        return self.models[key]
