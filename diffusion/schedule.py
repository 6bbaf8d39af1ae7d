"""Noise schedules, the forward process and the training objective (ε- or v-prediction).

Everything here follows DDPM (Ho et al. 2020); the tables and the objective are checked against
diffusers' schedulers in tests/test_schedule.py. The network knows nothing about diffusion:
`diffusion_loss` receives it as an argument.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from diffusion.config import ScheduleConfig

# net(x_t, t, context) -> ε or v (schedule.config.prediction_type), with t a LongTensor (B,).
Net = Callable[[Tensor, Tensor, Tensor], Tensor]

COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: keeps β small near t = 0
COSINE_MAX_BETA = 0.999  # ... and β clipped so the last step is not a singularity


# ----------------------------------------------------------------------------- betas


def _cosine_betas(num_train_timesteps: int) -> Tensor:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2) (Nichol & Dhariwal 2021,
    eq. 17).

    Computed in float64 and rounded once, as diffusers' `betas_for_alpha_bar` (squaredcos_cap_v2) does.
    """
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA).float()


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so that ᾱ_T = 0 while ᾱ_0 is unchanged (Lin et al. 2023, Algorithm 1).

    Kept in float32, step for step as in the paper and diffusers, so the betas match to the bit.
    """
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas  # the last β is exactly 1: pure noise at t = T - 1


def make_betas(cfg: ScheduleConfig) -> Tensor:
    """β_1..β_T as a float32 (T,) tensor, equal to diffusers' DDPMScheduler betas for the same config."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # DDPM paper: 1e-4 .. 0.02
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # SD / LDM: linear in √β
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "cosine":  # ignores beta_start / beta_end
        betas = _cosine_betas(T)
    else:
        raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; use 'linear', 'scaled_linear' or 'cosine'")
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


# ----------------------------------------------------------------------------- schedule


def per_sample(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] shaped (B, 1, ..., 1) to broadcast against `like`, on like's device."""
    values = table.to(like.device)[t]  # .to is free when the schedule already lives there
    return values.view(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """The fixed forward process q(x_t | x_0) over `num_train_timesteps` steps (Ho et al. 2020)."""

    def __init__(self, cfg: ScheduleConfig):
        self.config = cfg
        self.num_train_timesteps = cfg.num_train_timesteps
        self.betas = make_betas(cfg)  # (T,)
        self.alphas = 1 - self.betas  # (T,)
        # float32 cumprod, as diffusers does, so the ᾱ table matches theirs to the bit.
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy whose tables live on `device` (self when they already do)."""
        if self.alphas_cumprod.device == torch.device(device):
            return self
        moved = copy.copy(self)
        moved.betas, moved.alphas, moved.alphas_cumprod = (
            v.to(device) for v in (self.betas, self.alphas, self.alphas_cumprod)
        )
        return moved

    def snr(self, t: Tensor | int) -> Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021); 0 at t = T − 1 under zero terminal SNR."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar / (1 - alpha_bar)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), with one t per sample: t is (B,)."""
        alpha_bar = per_sample(self.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps

    def velocity(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022, sec. 4), with one t per sample: t is (B,)."""
        alpha_bar = per_sample(self.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


# ----------------------------------------------------------------------------- objective


def loss_weights(schedule: NoiseSchedule, t: Tensor, min_snr_gamma: Optional[float]) -> Tensor:
    """Per-sample Min-SNR-γ weights (Hang et al. 2023): min(SNR_t, γ)/SNR_t for ε-prediction and
    min(SNR_t, γ)/(SNR_t + 1) for v-prediction, so that both weigh the x0 error by min(SNR_t, γ).
    Ones when γ is None.

    The ε form is written as min(1, γ/SNR) so that SNR = 0 (zero terminal SNR) gives the limit 1, not 0/0.
    """
    snr = schedule.snr(t)
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    if schedule.config.prediction_type == "v_prediction":
        return snr.clamp(max=min_snr_gamma) / (snr + 1)
    return (min_snr_gamma / snr).clamp(max=1.0)


def diffusion_loss(
    net: Net,
    schedule: NoiseSchedule,
    x0: Tensor,
    context: Tensor,
    *,
    min_snr_gamma: Optional[float] = None,
    offset_noise: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The simplified DDPM objective E‖ε − ε_θ(x_t, t, c)‖² (Ho et al. 2020, eq. 14) as a scalar, or
    E‖v − v_θ(x_t, t, c)‖² when schedule.config.prediction_type is v_prediction (Salimans & Ho 2022).

    Args:
        net: the noise (or velocity) predictor, called once as net(x_t, t, context) with t a LongTensor (B,).
        schedule: the noise schedule; its tables may live on another device than x0.
        x0: clean (latent) samples (B, C, H, W).
        context: the conditioning passed through to the net unchanged.
        min_snr_gamma: γ of Min-SNR weighting (Hang et al. 2023); None for uniform weights.
        offset_noise: k in ε + k·n with n ~ N(0, 1) of shape (B, C, 1, 1), which lets the model
            shift a whole channel's mean (very dark or bright images). ε is the sum.
        generator: draws t, ε and n; it must live on x0's device. Same seed, same loss.

    Returns:
        The mean over samples of each sample's MSE. It is not checked for finiteness: the
        training loop decides whether to skip or stop on a NaN/inf loss.
    """
    B, C = x0.shape[:2]
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise:
        n = torch.randn((B, C) + (1,) * (x0.ndim - 2), generator=generator, device=x0.device, dtype=x0.dtype)
        eps = eps + offset_noise * n
    x_t = schedule.q_sample(x0, t, eps)
    target = schedule.velocity(x0, t, eps) if schedule.config.prediction_type == "v_prediction" else eps
    prediction = net(x_t, t, context)
    # Reduce in float32: under bf16 autocast the prediction is bf16, and a bf16 sum loses the loss.
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * loss_weights(schedule, t, min_snr_gamma).to(per_sample.device)
    return per_sample.mean()


# ----------------------------------------------------------------------------- inference timesteps


def _round_half_even(values: Tensor) -> Tensor:
    """numpy.round on float64 values (torch.round also rounds halves to even), as int64."""
    return torch.round(values).to(torch.int64)


def inference_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0
) -> Tensor:
    """The descending LongTensor of `steps` timesteps out of T, as diffusers' DDIMScheduler.set_timesteps.

    Spacings (Lin et al. 2023, table 2):
        leading:  arange(0, N)·(T//N), reversed, + steps_offset (SD uses offset 1).
        trailing: round(arange(T, 0, −T/N)) − 1; starts at T − 1, so it sees the last (noisiest) step.
        linspace: round(linspace(0, T − 1, N)), reversed.
    steps_offset applies to `leading` only, as in diffusers.
    """
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and num_train_timesteps={T}, got {steps}")
    if spacing == "leading":
        timesteps = torch.arange(steps, dtype=torch.int64).flip(0) * (T // steps) + steps_offset
        if timesteps[0] >= T or timesteps[-1] < 0:
            raise ValueError(
                f"steps_offset={steps_offset} with {steps} leading steps leaves [0, {T - 1}]; "
                "use steps_offset 0 or fewer steps"
            )
        return timesteps
    if spacing == "trailing":
        # numpy's float arange fills start + i·((start + step) − start); reproduce it to match diffusers
        # at the exact .5 ties that round half to even.
        delta = (T - T / steps) - T
        return _round_half_even(T + torch.arange(steps, dtype=torch.float64) * delta) - 1
    if spacing == "linspace":
        # numpy's linspace: i·((stop − start)/(N − 1)) + start, with the last value set to stop exactly.
        values = torch.arange(steps, dtype=torch.float64) * ((T - 1) / max(steps - 1, 1))
        values[-1] = T - 1 if steps > 1 else 0
        return _round_half_even(values).flip(0)
    raise ValueError(f"unknown timestep spacing {spacing!r}; use 'leading', 'trailing' or 'linspace'")
