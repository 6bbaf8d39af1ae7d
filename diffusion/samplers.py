"""Samplers: plain functions over one model contract, model(x_t, t) -> eps with t a LongTensor (B,)
(a float tensor for the σ samplers' Karras steps, which fall between table entries: sigma_samplers.py).

A sampler takes the model, the starting noise x, the training ᾱ table and the descending timesteps
(`schedule.inference_timesteps`), and returns the final sample. Each step function is checked
against diffusers' DDPMScheduler/DDIMScheduler.step in tests/test_samplers.py.

Guidance is a wrapper that turns the conditional net(x_t, t, context) into such a model.

ᾱ arguments (abar_t, abar_prev) may be python floats, 0-d tensors or per-sample (B, 1, 1, 1) tensors.
The loops pass python floats: the coefficients then cost no kernel launches and no device syncs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .schedule import per_sample

Model = Callable[[Tensor, Tensor], Tensor]  # model(x_t, t) -> eps
Callback = Callable[[int, int, Tensor], None]  # callback(i, t, x) after step i
Scalar = float | Tensor

# Under zero terminal SNR ᾱ_{T−1} = 0 and x0 = (x_t − ε)/√ᾱ is undefined for an ε-prediction model.
# Like diffusers' Euler scheduler we sample from ᾱ = 2⁻²⁴ instead (fp16's smallest subnormal).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def _sqrt(v: Scalar) -> Scalar:
    """√v for floats and tensors alike; clamps the tiny negatives that rounding makes of 1 − ᾱ − σ²."""
    return v.clamp(min=0).sqrt() if torch.is_tensor(v) else math.sqrt(max(v, 0.0))


def log_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """log σ_t = ½·log((1−ᾱ_t)/ᾱ_t) per training step, float64 on the CPU, ascending in t; ᾱ = 0 read as 2⁻²⁴."""
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    abar = torch.where(abar > 0, abar, ZERO_SNR_ALPHA_BAR)
    return 0.5 * torch.log((1 - abar) / abar)


def alpha_bar_at(log_sigma: Tensor, t: Tensor) -> Tensor:
    """ᾱ at fractional timesteps t: log σ interpolated linearly between the neighbouring table entries.

    The inverse of sigma_samplers.sigma_to_t (diffusers' `_sigma_to_t`); at an integer t it is the table's ᾱ.
    """
    low = t.floor().clamp(0, len(log_sigma) - 2)
    log_sigma_t = torch.lerp(log_sigma[low.long()], log_sigma[low.long() + 1], (t - low).to(log_sigma.dtype))
    return torch.sigmoid(-2 * log_sigma_t)  # ᾱ = 1/(1 + σ²)


# ----------------------------------------------------------------------------- single steps


def predict_x0(x_t: Tensor, eps: Tensor, abar_t: Scalar) -> Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (Ho et al. 2020, eq. 15)."""
    return (x_t - _sqrt(1 - abar_t) * eps) / _sqrt(abar_t)


def ddpm_step(
    x_t: Tensor, eps: Tensor, abar_t: Scalar, abar_prev: Scalar, noise: Optional[Tensor] = None
) -> Tensor:
    """One ancestral step from q(x_prev | x_t, x̂0) (Ho et al. 2020, eqs. 6–7), "fixed small" variance.

    With respaced timesteps β'_t = 1 − ᾱ_t/ᾱ_prev (Nichol & Dhariwal 2021, sec. 4). noise=None adds
    none (the last step).
    """
    alpha_t = abar_t / abar_prev  # α'_t
    beta_t = 1 - alpha_t  # β'_t
    x0 = predict_x0(x_t, eps, abar_t)
    # eq. 7: μ̃ = √ᾱ_prev·β'_t/(1−ᾱ_t)·x0 + √α'_t·(1−ᾱ_prev)/(1−ᾱ_t)·x_t
    mean = (_sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (_sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x_t
    if noise is None:
        return mean
    variance = (1 - abar_prev) / (1 - abar_t) * beta_t  # β̃_t, eq. 7
    return mean + _sqrt(variance) * noise


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    abar_t: Scalar,
    abar_prev: Scalar,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
) -> Tensor:
    """One DDIM step (Song et al. 2021, eq. 12), σ_t from eq. 16 scaled by η.

    x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z. η = 0 is deterministic; η = 1 has DDPM's
    posterior variance. noise (z) None adds no noise: the caller draws it, so seeds stay per image.
    """
    x0 = predict_x0(x_t, eps, abar_t)
    sigma = eta * _sqrt((1 - abar_prev) / (1 - abar_t)) * _sqrt(1 - abar_t / abar_prev)
    x_prev = _sqrt(abar_prev) * x0 + _sqrt(1 - abar_prev - sigma**2) * eps
    if noise is None or eta == 0:
        return x_prev
    return x_prev + sigma * noise


# ----------------------------------------------------------------------------- noise


def randn_like_per_image(x: Tensor, generators: Optional[Sequence[torch.Generator]]) -> Tensor:
    """N(0, I) shaped like x, image b drawn from generators[b]; torch.randn_like when generators is None.

    Each image is drawn in float32 on its generator's device, then moved: image b then depends on
    its seed alone, not on the batch size, the dtype or (for CPU generators) the accelerator.
    """
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for a batch of {x.shape[0]}")
    images = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(images).to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- sampling loops


def _step_table(
    alphas_cumprod: Tensor, timesteps: Tensor, final_alpha_cumprod: float
) -> list[tuple[int, float, float]]:
    """(t, ᾱ_t, ᾱ_prev) per step as python floats, built once before the loop.

    ᾱ_prev is ᾱ at the next timestep, and final_alpha_cumprod after the last one.
    """
    T = len(alphas_cumprod)
    ts = timesteps.tolist()  # with the ᾱ table's below, the loop's only device syncs
    if not ts or ts[0] >= T or ts[-1] < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending within [0, {T - 1}], got {ts}")
    abar = [a if a > 0 else ZERO_SNR_ALPHA_BAR for a in alphas_cumprod.tolist()]
    abar_prev = [abar[t] for t in ts[1:]] + [final_alpha_cumprod]
    return [(t, abar[t], prev) for t, prev in zip(ts, abar_prev)]


def _timestep_batches(timesteps: Tensor, x: Tensor) -> Tensor:
    """(steps, B) timesteps on x's device, moved once, so each step's t is a free row view; integer ones as long."""
    dtype = timesteps.dtype if timesteps.is_floating_point() else torch.long  # Karras σs fall between table entries
    return timesteps.to(device=x.device, dtype=dtype).view(-1, 1).expand(-1, x.shape[0])


def ddim(
    model: Model,
    x: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    eta: float = 0.0,
    final_alpha_cumprod: float = 1.0,
    generators: Optional[Sequence[torch.Generator]] = None,
    callback: Optional[Callback] = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from x ~ N(0, I) at timesteps[0] down to the data.

    Args:
        model: model(x_t, t) -> ε̂, t a LongTensor (B,).
        x: the starting noise (B, C, H, W), e.g. from randn_like_per_image.
        alphas_cumprod: the training ᾱ table (T,).
        timesteps: strictly descending training timesteps, e.g. schedule.inference_timesteps(...).
        eta: 0 deterministic, 1 ancestral (DDPM's variance on these timesteps).
        final_alpha_cumprod: ᾱ_prev after the last timestep: 1.0 (diffusers' set_alpha_to_one)
            or alphas_cumprod[0] (SD).
        generators: one per image for the η > 0 noise; None uses the global RNG.
        callback: callback(i, t, x) after step i, with x the new sample.
    """
    table = _step_table(alphas_cumprod, timesteps, float(final_alpha_cumprod))
    t_batches = _timestep_batches(timesteps, x)
    for i, (t, abar_t, abar_prev) in enumerate(table):
        eps = model(x, t_batches[i])
        noise = randn_like_per_image(x, generators) if eta > 0 else None
        x = ddim_step(x, eps, abar_t, abar_prev, eta, noise)
        if callback is not None:
            callback(i, t, x)
    return x


def ddpm(
    model: Model,
    x: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    generators: Optional[Sequence[torch.Generator]] = None,
    callback: Optional[Callback] = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), respaced onto `timesteps`.

    Arguments as for `ddim`; ᾱ_prev after the last timestep is 1 and that step adds no noise.
    """
    table = _step_table(alphas_cumprod, timesteps, 1.0)
    t_batches = _timestep_batches(timesteps, x)
    last = len(table) - 1
    for i, (t, abar_t, abar_prev) in enumerate(table):
        eps = model(x, t_batches[i])
        noise = randn_like_per_image(x, generators) if i < last else None
        x = ddpm_step(x, eps, abar_t, abar_prev, noise)
        if callback is not None:
            callback(i, t, x)
    return x


# ----------------------------------------------------------------------------- guidance


def conditional(net: Callable[[Tensor, Tensor, Any], Tensor], context: Tensor,
                prepare: Optional[Callable[[Tensor], Any]] = None) -> Model:
    """The sampler's model(x_t, t) for net(x_t, t, context) with a fixed context and no guidance.

    prepare, if given, maps the context once to what net takes at every step (UNet.prepare_context).
    """
    if prepare is not None:
        context = prepare(context)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        return net(x_t, t, context)

    return model


def epsilon_from_v(model: Model, alphas_cumprod: Tensor) -> Model:
    """A v-prediction model as an ε-prediction one: ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t (Salimans & Ho 2022, sec. 4).

    The map is affine in the model's output, so guidance applied before or after it gives the same ε.
    It uses the ᾱ that the samplers use: at a zero-SNR step (ᾱ = 0) ε would be x_t whatever the model
    says, while with ᾱ = 2⁻²⁴ the sampler's x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ comes out as √ᾱ·x_t − √(1−ᾱ)·v ≈ −v.
    An integer t reads the table; a float t (Karras σs between entries) interpolates log σ (`alpha_bar_at`).
    """
    log_sigma = log_sigmas(alphas_cumprod).float().to(alphas_cumprod.device)
    alphas_cumprod = torch.where(alphas_cumprod > 0, alphas_cumprod, ZERO_SNR_ALPHA_BAR)  # as _step_table does

    def model_eps(x_t: Tensor, t: Tensor) -> Tensor:
        if t.is_floating_point():
            abar = alpha_bar_at(log_sigma.to(x_t.device), t.float()).view(-1, *([1] * (x_t.ndim - 1)))
        else:
            abar = per_sample(alphas_cumprod, t, x_t)  # (B, 1, 1, 1)
        v = model(x_t, t)
        return (abar.sqrt() * v.float() + (1 - abar).sqrt() * x_t.float()).to(v.dtype)

    return model_eps


def classifier_free_guidance(
    net: Callable[[Tensor, Tensor, Any], Tensor], context: Tensor, uncond_context: Optional[Tensor], scale: float,
    prepare: Optional[Callable[[Tensor], Any]] = None,
) -> Model:
    """ε̂ = ε_u + s·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6 with s = 1 + w), one batched net call per step.

    uncond_context is the embedding of "" (or of the negative prompt), computed once by the caller;
    a batch of 1 is broadcast to the batch of context. scale 1 is the plain conditional model (and
    uncond_context may then be None). prepare is applied once to the batched contexts, as in `conditional`.
    """
    if scale == 1.0:
        return conditional(net, context, prepare)
    if uncond_context is None:
        raise ValueError(f"guidance scale {scale} needs uncond_context (the embedding of '' or the negative prompt)")
    if uncond_context.shape[0] == 1 and context.shape[0] > 1:
        uncond_context = uncond_context.expand(context.shape[0], *uncond_context.shape[1:])
    both_contexts = torch.cat([uncond_context, context])  # once, not per step
    if prepare is not None:
        both_contexts = prepare(both_contexts)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        eps_uncond, eps_cond = net(torch.cat([x_t, x_t]), torch.cat([t, t]), both_contexts).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return model
