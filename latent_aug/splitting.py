"""Split a classifier at a named layer into encoder f1 (x -> z) and head f2 (z -> y).

The model is traced with torch.fx, so functional activations, ``view``/``flatten`` and the
like are part of the graph. The split node must be a *cut*: every path from the input to the
output passes through it (a residual connection that jumps over it is an error).

Each part becomes a GraphModule that returns ``(output, vals)``: ``vals`` are the outputs of
the part's chain of layers, which the tied decoders read for their shapes and which
``reconstruction="all"`` uses as targets. The GraphModules hold the user's own submodules
(no copies), and returning values that are computed anyway costs nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn

from .decoders import (
    SHAPE_ATTRS,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
    ChainOp,
    FunctionCall,
    find_factory,
    is_activation,
    keeps_space,
)
from .errors import NotACutPointError, SplitNotFoundError, TracingError, close_matches


@dataclass
class Part:
    """One side of the split: ``fn(inp) -> (out, vals)`` plus its layer chain.

    ``chain`` is ``None`` when the part is not a chain of registered layers; ``blocker``
    then names the first layer that prevents a tied mirror.
    """

    fn: Callable[[Tensor], tuple[Tensor, list[Tensor]]]
    chain: list[ChainOp] | None
    blocker: str | None = None
    modules: list[nn.Module] = field(default_factory=list)


@dataclass
class Split:
    encoder: Part
    head: Part
    latent_name: str


def _tracer_for(model: nn.Module) -> fx.Tracer:
    leaf_types: tuple[type, ...] = ()
    try:  # timm marks some modules as fx leaves; honour them when timm is installed
        from timm.layers import _fx as timm_fx  # type: ignore[attr-defined]

        leaf_types = tuple(getattr(timm_fx, "_leaf_modules", ()))
    except Exception:  # noqa: BLE001 - optional integration
        pass

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if leaf_types and isinstance(m, leaf_types):
                return True
            if find_factory(m) is not None:  # a registered mirror: keep the layer whole
                return True
            return super().is_leaf_module(m, qualname)

    return _Tracer()


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` or raise :class:`TracingError` with the way out."""
    try:
        tracer = _tracer_for(model)
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            f"Use the explicit form SemanticNoiseWrapper(encoder=..., head=...) with the two "
            f"halves of your model as modules."
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__ + "Traced")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def _is_shape_node(node: fx.Node) -> bool:
    """Nodes that compute sizes or ints (``x.size(0)``, ``x.shape[1] * 2``), not tensors."""
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in SHAPE_ATTRS
    if node.op == "call_function" and node.target in SHAPE_FUNCTIONS:
        return all(_is_shape_node(n) for n in node.all_input_nodes)
    return False


def _activation_user(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The single activation that consumes ``node``, if there is exactly one such user."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    source = _source(user, modules)
    if source is None or user.args[:1] != (node,):
        return None
    return user if is_activation(source) else None


def _source(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function":
        return FunctionCall(node.target, tuple(node.args[1:]), dict(node.kwargs))
    if node.op == "call_method":
        return FunctionCall(node.target, tuple(node.args[1:]), dict(node.kwargs))
    return None


def _chain(
    nodes: list[fx.Node], start: fx.Node, modules: dict[str, nn.Module]
) -> tuple[list[fx.Node], list[ChainOp] | None, str | None]:
    """Order the tensor nodes of a part and check whether they form a mirrorable chain."""
    tensor_nodes = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    tensor_nodes = [n for n in tensor_nodes if not _is_shape_node(n)]
    ops: list[ChainOp] = []
    blocker = None
    prev = start
    for i, node in enumerate(tensor_nodes, start=1):
        if blocker is None:
            side = [
                n
                for n in node.all_input_nodes
                if n is not prev and not _is_shape_node(n) and n.op != "get_attr"
            ]
            source = _source(node, modules)
            if not node.args or node.args[0] is not prev or side:
                blocker = (
                    f"{node.name!r} (inputs {[n.name for n in node.all_input_nodes]}: "
                    f"not a chain, e.g. a residual or multi-input layer)"
                )
            elif any(isinstance(a, fx.Node) and not _is_shape_node(a) for a in node.args[1:]):
                blocker = f"{node.name!r} (takes a tensor argument besides its input)"
            elif find_factory(source) is None:
                what = type(source).__name__ if isinstance(source, nn.Module) else node.target
                blocker = f"{node.target if node.op == 'call_module' else node.name!r} ({what})"
            else:
                name = node.target if node.op == "call_module" else node.name
                ops.append(ChainOp(str(name), source, i, i))
        prev = node
    if blocker is not None:
        return tensor_nodes, None, blocker
    return tensor_nodes, _with_post(ops), None


def _with_post(ops: list[ChainOp]) -> list[ChainOp]:
    """Set each op's ``post`` to the last activation/identity output right after it."""
    out = list(ops)
    for i, op in enumerate(ops):
        post = op.index
        for nxt in ops[i + 1 :]:
            if keeps_space(nxt.source):
                post = nxt.index
            else:
                break
        out[i] = ChainOp(op.name, op.source, op.index, post)
    return out


def _part_module(
    root: nn.Module,
    nodes: list[fx.Node],
    inputs: dict[fx.Node, str],
    out: Any,
    vals: list[fx.Node],
    name: str,
) -> fx.GraphModule:
    """A GraphModule of ``nodes`` returning ``(out, [vals])``; ``inputs`` become placeholders."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node, ph in inputs.items():
        # keep the defaults of optional forward arguments (timm's ViT: attn_mask=None)
        has_default = node.op == "placeholder" and bool(node.args)
        default = node.args[0] if has_default else inspect.Parameter.empty
        env[node] = graph.placeholder(ph, default_value=default)
    for node in nodes:
        if node in env:
            continue
        for inp in node.all_input_nodes:  # constants reached from the other side
            if inp not in env and inp.op == "get_attr":
                env[inp] = graph.node_copy(inp, lambda n: env[n])
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output((fx.map_arg(out, lambda n: env[n]), [env[v] for v in vals]))
    graph.lint()
    return fx.GraphModule(root, graph, class_name=name)


def split_points(
    model: nn.Module, *, tied_head: bool = False, after_activation: bool = True
) -> list[str]:
    """Names of the modules at which ``model`` can be split, in execution order.

    Containers count too (``"layer4"`` of a ResNet, a ``Sequential`` stage): their output is
    the value that leaves them; a container and its last layer that share one output are
    listed innermost first. With ``tied_head`` only the points whose head f2 is a chain of
    registered layers, so that the tied head decoder g2' can mirror it (what the default
    class-conditional config needs)."""
    gm = trace(model)
    points = _cut_points(gm)
    if not tied_head:
        return [name for name, _ in points]
    modules = dict(gm.named_modules())
    live = _live(gm.graph)
    names = []
    for name, cut in points:
        if after_activation:
            cut = _activation_user(cut, modules) or cut
        if _chain(_head_nodes(gm.graph, cut, live), cut, modules)[1] is not None:
            names.append(name)
    return names


def _cut_points(gm: fx.GraphModule) -> list[tuple[str, fx.Node]]:
    """``(name, node whose output z would be)`` for every valid split, in execution order."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    found: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and counts[node.target] == 1:
            found[node.target] = node
    for name, node in _container_outputs(gm).items():
        found.setdefault(name, node)
    names = [name for name, node in found.items()
             if node not in out_node.all_input_nodes and _cut_violation(gm.graph, node) is None]
    names.sort(key=lambda n: (position[found[n]], -n.count(".")))
    return [(name, found[name]) for name in names]


def _container_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """For every module called once whose traced nodes hand exactly one value to the rest of
    the graph: that value's node. Leaf modules (one ``call_module`` node) are included."""
    inside: dict[str, list[fx.Node]] = {}
    calls: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        for key, (path, _) in node.meta.get("nn_module_stack", {}).items():
            inside.setdefault(path, []).append(node)
            calls.setdefault(path, set()).add(key)
    live = _live(gm.graph)
    outputs = {}
    for path, nodes in inside.items():
        if len(calls[path]) > 1:  # called more than once: no single output
            continue
        members = set(nodes)
        leaving = [n for n in nodes if n in live and any(u not in members for u in n.users)]
        if len(leaving) == 1:
            outputs[path] = leaving[0]
    return outputs


def _head_nodes(graph: fx.Graph, cut: fx.Node, live: set[fx.Node]) -> list[fx.Node]:
    """The live nodes after the cut (the head f2), in graph order."""
    encoder = _ancestors(cut)
    return [n for n in graph.nodes if n not in encoder and n.op != "output" and n in live]


def _live(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the output depends on (not shape assertions such as timm's ``_assert``)."""
    return _ancestors(next(n for n in graph.nodes if n.op == "output"))


def _cut_violation(graph: fx.Graph, cut: fx.Node) -> str | None:
    enc = _ancestors(cut)
    live = _live(graph)
    for node in graph.nodes:
        if node in enc or node.op == "output" or node not in live:
            continue
        for inp in node.all_input_nodes:
            if inp in enc and inp is not cut and inp.op != "get_attr" and not _is_shape_node(inp):
                return f"{node.name!r} uses {inp.name!r}"
    return None


def _container_call(gm: fx.GraphModule, split: str) -> list[fx.Node]:
    """``[the node whose value leaves the container split]``, or the error that says why
    there is no such node."""
    nodes = [n for n in gm.graph.nodes
             if any(path == split for path, _ in n.meta.get("nn_module_stack", {}).values())]
    if not nodes:
        raise SplitNotFoundError(
            f"split={split!r} is a module but the traced forward never runs it. Call "
            f"latent_aug.list_split_points(model) to see valid names."
        )
    runs = {key for n in nodes for key, (path, _) in n.meta["nn_module_stack"].items()
            if path == split}
    if len(runs) > 1:
        raise SplitNotFoundError(
            f"split={split!r} is ambiguous: the forward runs it {len(runs)} times. Split at a "
            f"module that runs once (see latent_aug.list_split_points(model))."
        )
    output = _container_outputs(gm).get(split)
    if output is None:
        raise SplitNotFoundError(
            f"split={split!r} is a container whose traced layers do not hand exactly one "
            f"value to the rest of the model (it returns several values, or none that is "
            f"used), so it has no single output to take as z. Split at one of its layers "
            f"(see latent_aug.list_split_points(model))."
        )
    return [output]


def split_model(model: nn.Module, split: str, *, after_activation: bool = True) -> Split:
    """Trace ``model`` and cut it after the module named ``split``.

    Raises :class:`SplitNotFoundError` for an unknown, ambiguous or degenerate name and
    :class:`NotACutPointError` when something skips over the split.
    """
    names = [n for n, _ in model.named_modules() if n]
    if split not in names:
        raise SplitNotFoundError(
            f"split={split!r} is not a module of {type(model).__name__}."
            f"{close_matches(split, names)} Call latent_aug.list_split_points(model) to see "
            f"valid names."
        )
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == split]
    if not calls:
        calls = _container_call(gm, split)
    if len(calls) > 1:
        raise SplitNotFoundError(
            f"split={split!r} is ambiguous: the forward calls it {len(calls)} times. "
            f"Split at a module that runs once (see latent_aug.list_split_points(model))."
        )
    cut = calls[0]
    latent_name = split
    if after_activation:
        act = _activation_user(cut, modules)
        if act is not None:
            cut = act
            latent_name = f"{split} (after {act.target if act.op == 'call_module' else act.name})"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    enc_nodes = [n for n in gm.graph.nodes if n in _ancestors(cut)]
    head_nodes = _head_nodes(gm.graph, cut, _live(gm.graph))
    head_calls = [n for n in head_nodes if n.op not in ("placeholder", "get_attr")]
    if not head_calls:
        raise SplitNotFoundError(
            f"split={split!r} is the model's output layer: the head f2 would be empty. Split "
            f"at the layer that produces the latent z, before the classifier (see "
            f"latent_aug.list_split_points(model))."
        )
    violation = _cut_violation(gm.graph, cut)
    if violation:
        raise NotACutPointError(
            f"split={split!r} does not separate {type(model).__name__} into encoder and head: "
            f"{violation} across the split (a skip connection or a second input). Choose a "
            f"module every path runs through (see latent_aug.list_split_points(model)), or "
            f"pass encoder= and head= explicitly."
        )
    x = placeholders[0]
    enc_chain_nodes, enc_ops, enc_block = _chain(enc_nodes, x, modules)
    head_chain_nodes, head_ops, head_block = _chain(head_nodes, cut, modules)
    encoder = _part_module(gm, enc_nodes, {p: p.name for p in placeholders}, cut,
                           enc_chain_nodes, "Encoder")
    head = _part_module(gm, head_nodes, {cut: "z"}, out_node.args[0], head_chain_nodes, "Head")
    return Split(
        Part(encoder, enc_ops, enc_block),
        Part(head, head_ops, head_block),
        latent_name=latent_name,
    )


def trace_part(module: nn.Module) -> Part:
    """A user-given encoder or head: traced into a chain where possible, else opaque."""
    if find_factory(module) is not None:  # one registered layer (e.g. a bare nn.Linear head)

        def single(x: Tensor) -> tuple[Tensor, list[Tensor]]:
            out = module(x)
            return out, [out]

        return Part(single, [ChainOp(type(module).__name__, module, 1, 1)], None)
    try:
        gm = trace(module)
    except TracingError as exc:
        return Part(_opaque(module), None, f"not traceable ({exc.__cause__})")
    nodes = list(gm.graph.nodes)
    x = next(n for n in nodes if n.op == "placeholder")
    out_node = next(n for n in nodes if n.op == "output")
    body = [n for n in nodes if n.op != "output"]
    chain_nodes, ops, block = _chain(body, x, dict(gm.named_modules()))
    placeholders = {n: n.name for n in nodes if n.op == "placeholder"}
    fn = _part_module(gm, body, placeholders, out_node.args[0], chain_nodes, "Part")
    return Part(fn, ops, block)


def _opaque(module: nn.Module) -> Callable[[Tensor], tuple[Tensor, list[Tensor]]]:
    def run(x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return module(x), []

    return run

