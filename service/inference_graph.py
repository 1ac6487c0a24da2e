"""A loaded model's TorchScript rewritten for inference on a CPU, and kept only if it answers as the model did.

After `torch.jit.freeze` (weights become constants; BatchNorm after an ordinary convolution is folded into it, as in
every encoder here), four rewrites of what a VAE decoder is made of:
- **BatchNorm folded into the transposed convolution before it**, which freeze leaves alone: a pass over each
  activation less, the largest of which (faces: 32 x 48 x 48 per image) cost as much as a tenth of a decode.
- **Linear layers with nothing non-linear between them composed into one**, where that costs fewer multiply-adds.
  faces' decoder starts Linear -> Linear -> unflatten -> transposed convolution -> BatchNorm, one affine map from
  the latent to 256 x 6 x 6 that took 13 M multiply-adds an image in three ops; as one Linear, 1.2 M.
- **A transposed convolution to a few channels** (a decoder's last, to the image) **as a matrix product and
  col2im**: oneDNN computes faces' 32 -> 3 at ~15 GFLOP/s, a fifth of the wider layers' rate.
- **Activations in place** where nothing else uses their input: one pass over memory instead of two.

faces in-process on the 2-vCPU machine, as saved -> rewritten (bench/README.md, *A decoder rewritten for
inference*): batch 1 on two threads 2.40 -> 0.88 ms, batch 32 on one 43.6 -> 29.2 ms, batch 64 on two
46.6 -> 34.7 ms, then 35.4 -> 32.0 ms with the activations in place. Outputs differ from the model as saved by
float rounding (< 1e-6 for faces: a few pixel values per million come out one level apart). Any rewrite that
fails, or whose answers to a probe batch differ by more than rounding, leaves the model as loaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("vae_serve.inference_graph")

OPS = ("encode", "decode")
NARROW_CHANNELS = 4  # a transposed convolution to at most this many channels runs as matmul + col2im
_SHAPE_ONLY = {"aten::dim", "aten::size"}  # uses of a tensor that folding its BatchNorm in does not change
Graph = Any  # torch._C.Graph, whose type stubs lack insert and insertConstant


def for_inference(name: str, module: Any, probes: Mapping[str, torch.Tensor]) -> Any:
    """`module` frozen and rewritten, if each op answers `probes[op]` as in `module`; else `module` itself."""
    try:
        with warnings.catch_warnings():  # torch 2.13 points TorchScript users to torch.compile; artifacts are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            frozen = torch.jit.freeze(module.eval(), preserved_attrs=list(OPS))
        changes = {op: rewrite(getattr(frozen, op).graph) for op in OPS}
        with torch.inference_mode():
            for op in OPS:
                check(op, getattr(module, op)(probes[op]), getattr(frozen, op)(probes[op]))
    except Exception as exc:  # a model the rewrites do not fit is served as it was saved
        log.warning("model %s is served as saved, not rewritten for inference (%s: %s)", name, type(exc).__name__, exc)
        return module
    done = "; ".join(f"{op}: {', '.join(op_changes)}" for op, op_changes in changes.items() if op_changes)
    log.info("model %s rewritten for inference%s", name, f" ({done})" if done else "")
    return frozen


def rewrite(graph: Graph) -> list[str]:
    """The rewrites on one frozen graph, in order; what they changed, for the log."""
    folded = _each(graph, "aten::batch_norm", fold_batch_norm)
    composed = _each(graph, "aten::linear", compose_affine_chain)
    narrow = _each(graph, "aten::conv_transpose2d", narrow_as_matmul)
    in_place = sum(_each(graph, kind, activation_in_place) for kind in _IN_PLACE)
    torch._C._jit_pass_dce(graph)
    return [what for count, what in ((folded, f"{folded} BatchNorm folded into transposed convolutions"),
                                     (composed, f"{composed} chains of linear layers composed into one"),
                                     (narrow, f"{narrow} narrow transposed convolutions as matmul + col2im"),
                                     (in_place, f"{in_place} activations in place")) if count]


def _each(graph: Graph, kind: str, change: Callable[[Graph, torch._C.Node], bool]) -> int:
    """Apply `change` to each node of `kind` until none changes. After a change the nodes are found again: a change
    may have removed some of those found before."""
    changed = 0
    while any(change(graph, node) for node in graph.findAllNodes(kind)):
        changed += 1
    return changed


def _is_constant(value: torch._C.Value) -> bool:
    return bool(value.node().kind() == "prim::Constant")


def _constant(value: torch._C.Value) -> Any:
    """A frozen graph's constant (a weight, a flag, a list of ints); None where the value is computed."""
    return value.toIValue() if _is_constant(value) else None


def _used_only_by(value: torch._C.Value, node: torch._C.Node) -> bool:
    """Whether `node` is the only use of `value` but for shape reads, which a rewrite of it leaves true."""
    return all(use.user is node or use.user.kind() in _SHAPE_ONLY for use in value.uses())


def _insert(graph: Graph, op: str, *args: Any) -> torch._C.Value:
    """`op(*args)` at the graph's insert point; arguments that are not graph values become constants."""
    return graph.insert(op, [a if isinstance(a, torch._C.Value) else graph.insertConstant(a) for a in args])


def fold_batch_norm(graph: Graph, bn: torch._C.Node) -> bool:
    """batch_norm(conv_transpose2d(x, w, b)) in eval mode -> conv_transpose2d(x, w * s, (b - mean) * s + beta), with
    s = gamma / sqrt(var + eps) per output channel (dim 1 of a transposed convolution's weight)."""
    y = bn.inputsAt(0)
    conv = y.node()
    if conv.kind() != "aten::conv_transpose2d" or not _used_only_by(y, bn):
        return False
    w, b, groups = (_constant(conv.inputsAt(i)) for i in (1, 2, 6))
    gamma, beta, mean, var, training, eps = (_constant(bn.inputsAt(i)) for i in (1, 2, 3, 4, 5, 7))
    if training is not False or groups != 1 or not all(isinstance(t, torch.Tensor) for t in (w, mean, var)):
        return False
    scale = torch.rsqrt(var.float() + eps)
    if isinstance(gamma, torch.Tensor):
        scale = scale * gamma.float()
    shift = (b.float() if isinstance(b, torch.Tensor) else 0.0) - mean.float()
    bias = shift * scale + (beta.float() if isinstance(beta, torch.Tensor) else 0.0)
    with graph.insert_point_guard(conv):
        conv.replaceInput(1, graph.insertConstant((w.float() * scale.view(1, -1, 1, 1)).to(w.dtype)))
        conv.replaceInput(2, graph.insertConstant(bias.to(w.dtype)))
    bn.output().replaceAllUsesWith(y)
    bn.destroy()
    return True


# Ops that are affine in their first input when every other input is a constant, as functions of it and those.
_AFFINE: dict[str, Callable[..., torch.Tensor]] = {
    "aten::linear": F.linear,
    "aten::unflatten": torch.unflatten,
    "aten::flatten": torch.flatten,
    "aten::conv_transpose2d": F.conv_transpose2d,
    "aten::conv2d": F.conv2d,
}


def compose_affine_chain(graph: Graph, first: torch._C.Node) -> bool:
    """linear -> (linear | unflatten | flatten | conv2d | conv_transpose2d)+, nothing non-linear between them and
    every input but the first a constant -> one linear layer, where that takes fewer multiply-adds. The composed map
    is the chain run on the identity, in float64. faces: Linear 128 -> 512 -> 4608, unflatten to 512 x 3 x 3,
    transposed convolution to 256 x 6 x 6 (13 M multiply-adds an image) -> Linear 128 -> 9216 (1.2 M), whose output
    is laid out channels-last as the transposed convolution's was."""
    chain = [first]
    while len(uses := chain[-1].output().uses()) == 1 and uses[0].user.kind() in _AFFINE:
        chain.append(uses[0].user)
    weight = _constant(first.inputsAt(1))
    if len(chain) < 2 or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    inputs = [list(node.inputs())[1:] for node in chain]
    if not all(_is_constant(v) for values in inputs for v in values):
        return False  # an input computed at run time
    args = [[_as_float64(v.toIValue()) for v in values] for values in inputs]

    def run(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The chain's output for `x`, and its multiply-adds for one row."""
        cost = 0
        for node, node_args in zip(chain, args, strict=True):
            y = _AFFINE[node.kind()](x, *node_args)
            cost += _multiply_adds(node.kind(), node_args, x, y)
            x = y
        return x, cost

    width = weight.shape[1]
    with torch.inference_mode():
        offset, chain_cost = run(torch.zeros(1, width, dtype=torch.float64))  # (1, *shape)
        columns = run(torch.eye(width, dtype=torch.float64))[0] - offset  # (width, *shape)
    shape = offset.shape[1:]
    if width * offset.numel() >= chain_cost:
        return False
    if len(shape) == 3:  # (C, H, W), kept channels-last: (H, W, C) in memory
        columns, offset = columns.permute(0, 2, 3, 1), offset.permute(0, 2, 3, 1)

    last = chain[-1]
    with graph.insert_point_guard(last):
        matrix = columns.reshape(width, -1).t().contiguous().to(weight.dtype)
        out = _insert(graph, "aten::linear", first.inputsAt(0), matrix, offset.reshape(-1).to(weight.dtype))
        if len(shape) == 3:
            unflat = _insert(graph, "aten::unflatten", out, -1, [shape[1], shape[2], shape[0]])
            out = _insert(graph, "aten::movedim", unflat, -1, -3)
        elif len(shape) > 1:
            out = _insert(graph, "aten::unflatten", out, -1, list(shape))
    last.output().replaceAllUsesWith(out)
    for node in reversed(chain):
        node.destroy()
    return True


def _as_float64(value: Any) -> Any:
    return value.double() if isinstance(value, torch.Tensor) else value


def _multiply_adds(kind: str, args: list[Any], x: torch.Tensor, y: torch.Tensor) -> int:
    """What one op of an affine chain costs for an input of one row."""
    weight = args[0]
    if kind == "aten::linear":
        return int(weight.numel())
    if kind == "aten::conv_transpose2d":  # each input value times a C_out / groups x kh x kw slice of the weight
        return int(x[0].numel() * weight[0].numel())
    if kind == "aten::conv2d":  # each output value from a C_in / groups x kh x kw slice
        return int(y[0].numel() * weight[0].numel())
    return 0  # reshapes


def narrow_as_matmul(graph: Graph, conv: torch._C.Node) -> bool:
    """conv_transpose2d(x, w, b) to at most NARROW_CHANNELS channels -> col2im(w' @ x) + b, where w' is w as
    (C_out * kh * kw, C_in): each input pixel's contribution to a kh x kw patch of the output, summed by col2im.
    Also for an unbatched (C, H, W) input; output size (in - 1) * stride - 2 * pad + dilation * (k - 1) + out_pad + 1."""
    x = conv.inputsAt(0)
    w, b, stride, pad, out_pad, groups, dilation = (_constant(conv.inputsAt(i)) for i in range(1, 8))
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or groups != 1 or w.shape[1] > NARROW_CHANNELS:
        return False
    if not all(isinstance(v, list) and len(v) == 2 for v in (stride, pad, out_pad, dilation)):
        return False
    c_in, c_out, kh, kw = w.shape

    with graph.insert_point_guard(conv):
        rows = _insert(graph, "aten::flatten", x, -2, -1)
        patches = _insert(graph, "aten::matmul", w.reshape(c_in, c_out * kh * kw).t().contiguous(), rows)
        size = []
        for dim, k in ((0, kh), (1, kw)):
            steps = _insert(graph, "aten::mul", _insert(graph, "aten::sub", _insert(graph, "aten::size", x, dim - 2), 1),
                            stride[dim])
            size.append(_insert(graph, "aten::add", steps, dilation[dim] * (k - 1) + out_pad[dim] + 1 - 2 * pad[dim]))
        size_list = graph.insertNode(graph.create("prim::ListConstruct", size, 1))
        size_list.output().setType(torch._C.ListType.ofInts())
        out = _insert(graph, "aten::col2im", patches, size_list.output(), [kh, kw], dilation, pad, stride)
        if isinstance(b, torch.Tensor):
            out = _insert(graph, "aten::add", out, b.view(-1, 1, 1))
    conv.output().replaceAllUsesWith(out)
    conv.destroy()
    return True


# Activations that can overwrite their input, and the ops whose output is a tensor of their own (not a view of
# another, nor a graph input or constant), which an activation may then overwrite.
_IN_PLACE = {"aten::leaky_relu": "aten::leaky_relu_", "aten::relu": "aten::relu_", "aten::sigmoid": "aten::sigmoid_"}
_FRESH = {"aten::conv_transpose2d", "aten::conv2d", "aten::linear", "aten::add", *_IN_PLACE, *_IN_PLACE.values()}


def activation_in_place(graph: Graph, node: torch._C.Node) -> bool:
    """An activation whose input is used by nothing else (shape reads aside) overwrites it: no new tensor, and one
    pass over memory instead of two (faces, batch 64 on two threads: 35.4 -> 32.0 ms)."""
    x = node.inputsAt(0)
    if x.node().kind() not in _FRESH or not _used_only_by(x, node):
        return False
    with graph.insert_point_guard(node):
        out = _insert(graph, _IN_PLACE[node.kind()], *node.inputs())
    node.output().replaceAllUsesWith(out)
    node.destroy()
    return True


def check(op: str, expected: Any, got: Any) -> None:
    """Raise unless the rewritten op's outputs match the original's within the rounding of their dtype."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    if len(expected) != len(got):
        raise ValueError(f"{op} answered {len(got)} tensors instead of {len(expected)}")
    for e, g in zip(expected, got, strict=True):
        tolerance = 1e-4 if e.dtype in (torch.float32, torch.float64) else 3e-2
        if e.shape != g.shape or not torch.allclose(e.float(), g.float(), rtol=tolerance, atol=tolerance):
            raise ValueError(f"{op} answered a probe batch differently after the rewrite")
