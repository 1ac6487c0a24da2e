"""A `/sample` request's latents: its own seed's, as torch draws them anywhere, whichever batch it joins."""

from __future__ import annotations

import torch

from service.latents import Prior


def drawn_by_torch(prior: Prior) -> torch.Tensor:
    generator = torch.Generator().manual_seed(prior.seed)
    return torch.randn(prior.n, prior.latent_dim, generator=generator) * prior.temperature


def test_a_request_s_latents_are_torch_s_from_its_seed_scaled_by_its_temperature() -> None:
    for prior in (Prior(7, 1, 20), Prior(0, 3, 128, 0.5), Prior(2**63 - 1, 64, 20, 2.0)):
        assert torch.equal(prior(), drawn_by_torch(prior))


def test_requests_drawn_together_get_the_latents_each_would_get_alone_in_order() -> None:
    priors = [Prior(7, 1, 20), Prior(2**63 - 1, 16, 20, 0.5), Prior(0, 3, 20), Prior(7, 1, 20, 0.8)]
    assert torch.equal(Prior.together(priors), torch.cat([drawn_by_torch(p) for p in priors]))
