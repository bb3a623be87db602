"""Cut a plain module into early-exit stages with ``torch.fx``.

The backbone is traced once by ``torch.fx``'s symbolic tracer: the image is its only
input, any other ``forward`` argument is fixed to its default. The graph is a list of
nodes in execution order; an exit after the submodule ``name`` cuts that list right after
the node that ``name``'s call returns. Each piece becomes a ``GraphModule`` sharing the
backbone's parameters. It takes exactly the values defined before its start and used after
it (the carried tensors: one in a plain chain of layers, two inside a residual block),
returns those still needed after its end, and the exit's feature. The last piece returns
the backbone's own output. Stages built on these pieces (``models.multi_exit``) keep
``models.early_exit``'s contract, so the ONNX export, the cost counter and the parity gate
need nothing of their own.

What cannot be cut, and says so naming the module:

* a ``forward`` whose path depends on tensor values (``if x.sum() > 0``, a loop until a
  tensor converges): it has no single graph, and torch.fx refuses to trace it. The error
  names the innermost submodule being traced when it failed.
* an exit after a submodule that ``forward`` calls more than once, or never, or that does
  not return one tensor;
* a value other than a batch-first tensor crossing a cut (a Python number computed from a
  shape early and used late): the stages would have to carry it, and only tensors travel
  between ONNX stages.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from exitserve.errors import ExitserveError


class CutError(ExitserveError, ValueError):
    """A module that cannot be cut into stages where it was asked to be; the message names
    the module and says why."""


class _RecordingTracer(fx.Tracer):
    """Remembers what every submodule call returned, and the innermost submodule whose
    tracing raised (the one an error message must name)."""

    def __init__(self) -> None:
        super().__init__()
        # buffers read in forward become graph inputs read at run time, not constants frozen
        # at trace time: the cut is made before the user's weights are loaded
        self.proxy_buffer_attributes = True
        self.outputs: dict[str, list[Any]] = defaultdict(list)
        self.failed_in: tuple[str, str] | None = None  # (qualified name, class name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:  # a module made inside forward: nothing to cut after
            return super().call_module(m, forward, args, kwargs)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (name, type(m).__name__)
            raise
        self.outputs[name].append(out)
        return out


@dataclass
class Trace:
    """The backbone's graph and, per submodule name, what each of its calls returned."""

    backbone: nn.Module
    graph: fx.Graph
    outputs: dict[str, list[Any]]

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    @property
    def result(self) -> fx.Node:
        """The node ``forward`` returns: one tensor, the logits."""
        output = self.nodes[-1]
        value = output.args[0]
        if not isinstance(value, fx.Node):
            raise CutError(f"{type(self.backbone).__name__}.forward returns {type(value).__name__}, not one logits "
                           "tensor: the last exit is the backbone's own output")
        return value

    def call_node(self, name: str) -> fx.Node:
        """The node submodule ``name``'s one call returns."""
        calls = self.outputs.get(name, [])
        owner = type(self.backbone).__name__
        if not calls:
            raise CutError(f"{name} is never called by {owner}.forward: nothing to cut after")
        if len(calls) > 1:
            raise CutError(f"{name} is called {len(calls)} times by {owner}.forward: an exit follows a submodule "
                           "called once")
        if not isinstance(calls[0], fx.Proxy):
            raise CutError(f"{name} returns {type(calls[0]).__name__}, not one tensor: an exit follows a submodule "
                           "that returns one tensor")
        return calls[0].node

    def live_after(self, position: int) -> list[fx.Node]:
        """The values defined up to ``position`` and used after it, in execution order: what
        a cut there must carry. Parameters (``get_attr``) are read again where used."""
        nodes = self.nodes
        index = {n: i for i, n in enumerate(nodes)}
        return [n for n in nodes[: position + 1]
                if n.op != "get_attr" and any(index[u] > position for u in n.users)]


def trace(backbone: nn.Module) -> Trace:
    """Trace ``backbone`` in eval mode (what a traced ``self.training`` branch is fixed to:
    stages serve); ``forward``'s arguments after the image are fixed to their defaults."""
    owner = type(backbone).__name__
    parameters = list(inspect.signature(backbone.forward).parameters.values())
    if not parameters:
        raise CutError(f"{owner}.forward takes no image")
    fixed = {}
    for p in parameters[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise CutError(f"{owner}.forward takes {p.name!r} beside the image and it has no default: "
                           "a cut backbone takes the image alone")
        fixed[p.name] = p.default
    tracer = _RecordingTracer()
    was_training = backbone.training
    backbone.eval()
    try:
        graph = tracer.trace(backbone, concrete_args=fixed or None)
    except Exception as exc:
        where = (f"submodule {tracer.failed_in[0]} ({tracer.failed_in[1]})" if tracer.failed_in
                 else f"{owner}.forward itself")
        reason = " ".join(str(exc).split("\n")[0].split())
        raise CutError(
            f"cannot cut {owner}: torch.fx failed tracing {where}: {reason}. Stages are cut from one static "
            "graph, so control flow that depends on a tensor's values (an if or a loop on them) cannot be cut: "
            "move it out of forward, or subclass exitserve.EarlyExitModel and write stages() yourself"
        ) from exc
    finally:
        backbone.train(was_training)
    _specialize_fixed_arguments(graph)
    return Trace(backbone, graph, dict(tracer.outputs))


def _specialize_fixed_arguments(graph: fx.Graph) -> None:
    """Replace the placeholders of fixed arguments by their values, so the image is the
    only input left (stage 0 takes the image alone)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        value = node.args[0] if node.args else None
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n, node=node: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n, node=node: value if n is node else n)
        graph.erase_node(node)
    graph.lint()


@dataclass
class Cut:
    """The backbone in pieces. ``segments[k](*carried) -> (carried after cut k, feature at
    exit k)``; the last returns ``((), backbone output)``. ``carried[k]`` names the values
    segment ``k`` hands on (for error messages)."""

    segments: list[fx.GraphModule]
    exit_names: list[str]
    final_name: str
    carried: list[list[str]]


def cut_at(backbone: nn.Module, exits: Sequence[str]) -> Cut:
    """Cut ``backbone`` after each submodule named in ``exits`` (in the order forward runs them)."""
    owner = type(backbone).__name__
    exits = list(exits)
    known = [name for name, _ in backbone.named_modules() if name]
    unknown = [name for name in exits if name not in set(known)]
    if unknown:
        raise CutError(f"{owner} has no submodule {', '.join(map(repr, unknown))}; its submodules: "
                       f"{', '.join(known)}")
    if len(set(exits)) != len(exits):
        raise CutError(f"an exit is named twice in {exits}")
    traced = trace(backbone)
    nodes = traced.nodes
    index = {n: i for i, n in enumerate(nodes)}
    result = traced.result
    cut_nodes = [traced.call_node(name) for name in exits]
    for name, node in zip(exits, cut_nodes):
        if node is result:
            raise CutError(f"{name} computes {owner}'s output, which is the last exit already")
    for (a, na), (b, nb) in zip(zip(exits, cut_nodes), zip(exits[1:], cut_nodes[1:])):
        if na is nb:
            raise CutError(f"{a} and {b} end at the same point of {owner}.forward: one exit there is enough")
    order = sorted(exits, key=lambda name: index[cut_nodes[exits.index(name)]])
    if order != exits:
        raise CutError(f"list the exits in the order {owner}.forward computes them: {','.join(order)}")
    bounds = [index[n] for n in cut_nodes] + [index[result]]
    live = [traced.live_after(p) for p in bounds[:-1]]
    image = nodes[0]
    segments = []
    for k in range(len(bounds)):
        start = bounds[k - 1] + 1 if k else 1
        inputs = live[k - 1] if k else [image]
        outputs = live[k] if k < len(live) else []
        feature = cut_nodes[k] if k < len(cut_nodes) else result
        graph = _piece(inputs, nodes[start : bounds[k] + 1], outputs, feature)
        segments.append(fx.GraphModule(backbone, graph, class_name=f"{owner}Segment{k}"))
    return Cut(segments, exits, _final_name(traced, result), [[n.name for n in c] for c in live] + [[]])


def _piece(inputs: list[fx.Node], body: list[fx.Node], outputs: list[fx.Node], feature: fx.Node) -> fx.Graph:
    """A graph of ``body``'s nodes taking ``inputs`` and returning ``(outputs, feature)``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(n.name) for n in inputs}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a parameter read (get_attr) defined earlier: read it again here
            assert n.op == "get_attr", n
            env[n] = graph.node_copy(n)
        return env[n]

    for node in body:
        if node.op != "get_attr":  # copied where used
            env[node] = graph.node_copy(node, lookup)
    graph.output((tuple(lookup(n) for n in outputs), lookup(feature)))
    graph.lint()
    return graph


def _final_name(traced: Trace, result: fx.Node) -> str:
    """The last exit's name: the outermost submodule returning the backbone's output (``fc``),
    else ``output``."""
    names = [name for name, calls in traced.outputs.items()
             if len(calls) == 1 and isinstance(calls[0], fx.Proxy) and calls[0].node is result]
    return min(names, key=lambda name: name.count(".")) if names else "output"


# ----------------------------------------------------------------------------- where to cut


@dataclass(frozen=True)
class CutPoint:
    """A place an exit head can go: after submodule ``name``, whose output (``shape`` at
    batch 1) is then the only value crossing the cut; ``flops_fraction`` of the backbone's
    multiply-adds come before it."""

    name: str
    flops_fraction: float
    shape: tuple[int, ...]


class _CountingInterpreter(fx.Interpreter):
    """Runs the graph node by node, counting each node's multiply-adds and keeping each
    node's output shape."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.flops: dict[fx.Node, int] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        counter = FlopCounterMode(display=False)
        with counter:
            out = super().run_node(n)
        self.flops[n] = counter.get_total_flops() // 2
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def cut_points(backbone: nn.Module, input_shape: tuple[int, int, int]) -> list[CutPoint]:
    """Where ``auto:K`` may put exits, in execution order: after a block, an activation or a
    pooling layer (``_ends_a_step``), where one feature map (N x C x H x W) alone crosses the
    cut; each named by the outermost submodule ending there (``layer1``, not ``layer1.1``)."""
    traced = trace(backbone)
    nodes = traced.nodes
    index = {n: i for i, n in enumerate(nodes)}
    counter = _CountingInterpreter(fx.GraphModule(backbone, traced.graph))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            counter.run(torch.zeros(1, *input_shape))
    finally:
        backbone.train(was_training)
    cumulative, total = {}, 0
    for n in nodes:
        total += counter.flops.get(n, 0)
        cumulative[n] = total
    result = traced.result
    by_node: dict[fx.Node, str] = {}
    for name, module in backbone.named_modules():
        if not _ends_a_step(module):
            continue
        calls = traced.outputs.get(name, [])
        if len(calls) != 1 or not isinstance(calls[0], fx.Proxy):
            continue
        node = calls[0].node
        if node is result or len(counter.shapes.get(node, ())) != 4 or traced.live_after(index[node]) != [node]:
            continue
        if node not in by_node or name.count(".") < by_node[node].count("."):
            by_node[node] = name
    points = sorted(by_node.items(), key=lambda item: index[item[0]])
    return [CutPoint(name, cumulative[node] / max(total, 1), counter.shapes[node]) for node, name in points]


_STEP_ENDS = ("torch.nn.modules.activation", "torch.nn.modules.pooling")


def _ends_a_step(module: nn.Module) -> bool:
    """Whether a head may follow ``module`` when placing exits automatically: a block (a
    module with submodules) or an activation or pooling layer; never a convolution before
    its normalisation, or a normalisation before its activation."""
    return next(module.children(), None) is not None or type(module).__module__ in _STEP_ENDS


def even_exits(points: Sequence[CutPoint], count: int) -> list[CutPoint]:
    """``count`` cut points nearest to even shares of the FLOPs (1/(count+1), 2/(count+1),
    ...), in order, each after the one before."""
    if count < 1:
        raise CutError(f"auto:{count}: at least one exit")
    if len(points) < count:
        raise CutError(f"auto:{count}: the backbone has only {len(points)} clean cut points "
                       f"({', '.join(p.name for p in points) or 'none'}); name the exits instead")
    chosen: list[CutPoint] = []
    start = 0
    for i in range(1, count + 1):
        target = i / (count + 1)
        # leave enough points after this one for the exits still to place
        window = points[start : len(points) - (count - i)]
        best = min(range(len(window)), key=lambda j: abs(window[j].flops_fraction - target))
        chosen.append(window[best])
        start += best + 1
    return chosen
