"""A `/sample` request's latents: drawn from its own seed, so the numbers are the same whichever batch it joins, and
the same as `torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))` anywhere torch runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.artifact import quiet_torchscript


@dataclass(frozen=True)
class Prior:
    """A request's latents, drawn from its seed when called: N(0, temperature^2 I). For a one-image PNG answer they
    are drawn on the batch's thread (`batcher.Deferred`), not the event loop, where each torch call lets go of the
    GIL and under load waits to take it back: mnist at 64 connections 2,940 -> 3,216 and 3,867 -> 3,938 requests/s
    with 5-7% less CPU (alternating servers, 4 rounds each); faces the same, its lanes set its pace (bench/README.md).
    A batch's requests are drawn `together`, in one call."""

    seed: int
    n: int
    latent_dim: int
    temperature: float = 1.0

    def __len__(self) -> int:
        return self.n

    def __call__(self) -> torch.Tensor:
        z = torch.randn(self.n, self.latent_dim, generator=torch.Generator().manual_seed(self.seed))
        if self.temperature != 1.0:
            z *= self.temperature
        return z

    def failure(self) -> None:  # a seed always draws
        return None

    @classmethod
    def together(cls, priors: Sequence[Prior]) -> torch.Tensor:
        """The latents of `priors` (of one model) in a row, each from its own seed: one request's from Python (5 us
        instead of TorchScript's 10), several in one TorchScript call (`draw`)."""
        if len(priors) == 1:
            return priors[0]()
        return draw([p.seed for p in priors], [p.n for p in priors], priors[0].latent_dim, [p.temperature for p in priors])


# One TorchScript call for a batch's draws. From Python each request's randn lets go of the GIL (its generator and seed
# do not), 24 hand-overs for a batch of 24 mnist digits, and a lane waits to take each back from the event loop: with
# a thread busy beside it, a randn of 20 numbers took 5 ms, a switch interval. Drawn in one call, mnist's batches at
# 64 connections took 7.7 ms instead of 9.3 (bench/README.md, *A batch's latents in one call*). TorchScript's
# generator and randn are torch's own: the same numbers.
def _draw(seeds: list[int], sizes: list[int], latent_dim: int, temperatures: list[float]) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    for seed, n, temperature in zip(seeds, sizes, temperatures):  # noqa: B905 (TorchScript: no strict=)
        generator = torch.Generator()
        generator.manual_seed(seed)
        z = torch.randn([n, latent_dim], generator=generator)
        if temperature != 1.0:
            z *= temperature
        rows.append(z)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


with quiet_torchscript():
    draw = torch.jit.script(_draw)
