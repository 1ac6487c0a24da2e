"""CUDA graphs: replay a model operation captured at fixed batch sizes instead of launching its kernels one by one.

A batch of a small model is dozens of short kernels; launched one by one from Python through TorchScript, each
costs the CPU more time than the GPU needs to run it. A graph launches all of them at once. A batch is padded up to
the next captured size: the rows of an eval-mode VAE (BatchNorm with running statistics) are independent, so the
padding changes nothing in the real rows, and it is zeroed so that every replay computes the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Op = Callable[[Tensor], Tensor | tuple[Tensor, ...]]


def batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The sizes to capture: powers of two up to the largest batch, and the largest batch itself."""
    return tuple(sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size} | {max_batch_size}))


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # the graph reads its batch from here...
    outputs: tuple[Tensor, ...]  # ...and writes its answer here, on every replay


class GraphedOp:
    """`op` (one input tensor -> a tensor or a tuple of tensors, one row per input row) replayed from CUDA graphs.

    Call it from one thread at a time (the model thread), and use what it returns before the next call: the answer
    is a view of the graph's output buffers, which the next replay overwrites."""

    def __init__(self, op: Op, example: Tensor, sizes: Sequence[int], warm_up: int = 3) -> None:
        """Capture `op` at each size; `example` is one input row (1, ...) with the device and dtype to use."""
        self._op = op
        self._sizes = sorted(set(sizes))
        self._captured: dict[int, _Captured] = {}
        self._tuple = False
        stream = torch.cuda.Stream(example.device)
        pool = None
        with torch.inference_mode():
            for size in reversed(self._sizes):  # largest first: the smaller graphs reuse its memory pool
                inputs = example.expand(size, *example.shape[1:]).clone()
                # Warm up on a side stream, as capture requires: TorchScript profiles and optimises a shape in its
                # first runs, and the allocator must already hold what the op needs.
                stream.wait_stream(torch.cuda.current_stream(example.device))
                with torch.cuda.stream(stream):
                    for _ in range(warm_up):
                        op(inputs)
                torch.cuda.current_stream(example.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = op(inputs)
                pool = graph.pool()
                self._tuple = isinstance(out, tuple)
                self._captured[size] = _Captured(graph, inputs, out if isinstance(out, tuple) else (out,))

    @property
    def sizes(self) -> list[int]:
        return list(self._sizes)

    def __call__(self, inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        n = len(inputs)
        size = next((s for s in self._sizes if s >= n), None)
        if size is None:  # larger than any captured batch (the batcher never sends one): run it as it is
            return self._op(inputs.to(self._captured[self._sizes[-1]].inputs))
        captured = self._captured[size]
        with torch.inference_mode():  # the buffers are inference tensors: only written to in inference mode
            captured.inputs[:n].copy_(inputs)  # from the host, and to the graph's dtype, in one copy
            if n < size:
                captured.inputs[n:].zero_()
            captured.graph.replay()
        outputs = tuple(o[:n] for o in captured.outputs)
        return outputs if self._tuple else outputs[0]
