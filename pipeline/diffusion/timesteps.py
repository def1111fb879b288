"""Timestep samplers for training: t uniform (Algorithm 1), or importance-sampled by each
timestep's loss for the vlb loss (Nichol & Dhariwal 2021); both return the weights that keep
the loss unbiased."""

from __future__ import annotations

from typing import Any, Optional

import torch


class UniformTimesteps:
    """t ~ Uniform{0..T-1}, importance weights 1 (Algorithm 1)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None):
        """(t, weights): timesteps of shape (B,) and the weights 1 / (T p_t) that unbias them."""
        probs = self.probabilities()
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.multinomial(probs.to(gen_device), batch_size, replacement=True,
                              generator=generator)
        weights = 1.0 / (self.num_timesteps * probs.to(gen_device)[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from losses."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossSecondMomentTimesteps(UniformTimesteps):
    """p_t proportional to sqrt(E[L_t^2]) over the last `history` losses at each t, mixed with a
    little uniform mass (Nichol & Dhariwal 2021, Eq. 18); uniform until every t has a full
    history. Unbiased through the weights 1 / (T p_t)."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        if not bool((self.counts >= self.history).all()):
            return super().probabilities()
        weights = torch.sqrt((self.losses ** 2).mean(dim=1))
        weights = weights / weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for t_index, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            slot = self.counts[t_index] % self.history
            self.losses[t_index, slot] = loss
            self.counts[t_index] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def timestep_sampler(diffusion_cfg, num_timesteps: int) -> UniformTimesteps:
    """The training-time sampler of t for a `DiffusionConfig`."""
    if diffusion_cfg.importance_sampling:
        return LossSecondMomentTimesteps(num_timesteps)
    return UniformTimesteps(num_timesteps)
