"""σ-space samplers (Karras et al. 2022, with k-diffusion's conventions) over samplers.py's model contract.

Each has DDIM's signature, fn(model, x, alphas_cumprod, timesteps, *, generators, callback, karras) -> x0:
model(x_t, t) -> ε̂ is a VP ε-model (x_t = √ᾱ·x0 + √(1−ᾱ)·ε; wrap v-models with samplers.epsilon_from_v),
x the starting noise z ~ N(0, I) (B, C, H, W), timesteps the descending ones of schedule.inference_timesteps.
Inside, the sample lives in σ-space, x = x_t·√(σ²+1) = x0 + σ·ε with σ_t = √((1−ᾱ_t)/ᾱ_t):
- the σs are those of `timesteps`, or with karras=True ρ = 7 between the first and last of them, then one 0;
- the network sees x/√(σ²+1) and t; a Karras σ between table entries gives a float t, interpolated in log σ;
- the denoiser is D = x − σ·ε̂.
Steps run in float32 (float64 stays float64) whatever the model's dtype; the result has x's dtype.
callback(i, t, x) after step i gets the VP sample x/√(σ_next²+1), as DDIM's gives x_t, so previews decode alike.
Every sampler is checked against diffusers' Euler, Euler ancestral and DPM-Solver multistep schedulers in
tests/test_sigma_samplers.py, whose comments list where diffusers departs from the papers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .samplers import Callback, Model, _step_table, _timestep_batches, log_sigmas, randn_like_per_image

# ----------------------------------------------------------------------------- σ schedules


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < n, then 0 (Karras et al. 2022, eq. 5).

    Returns the n + 1 σs as a float64 tensor, strictly decreasing to exactly one terminal 0.
    """
    if n < 1 or (n > 1 and not 0 < sigma_min < sigma_max):
        raise ValueError(f"Karras σs need n ≥ 1 and 0 < sigma_min < sigma_max, got n={n}, {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_to_t(sigma: Tensor, log_sigma: Tensor) -> Tensor:
    """The fractional timesteps whose log σ, interpolated between table entries, is log σ (float64).

    log_sigma is samplers.log_sigmas(ᾱ); samplers.alpha_bar_at is the inverse. As diffusers' `_sigma_to_t`.
    """
    log_s = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigma, log_s, right=True) - 1).clamp(0, len(log_sigma) - 2)
    w = (log_s - log_sigma[low]) / (log_sigma[low + 1] - log_sigma[low])
    return low + w.clamp(0, 1)


def sampling_sigmas(alphas_cumprod: Tensor, timesteps: Tensor, karras: bool = False) -> tuple[Tensor, Tensor]:
    """(σs, model timesteps) for sampling on `timesteps`.

    σs: the steps' σs then one 0, (steps + 1,) float64 and strictly decreasing. With karras, ρ = 7 between
    the σs of the first and last timestep (diffusers' `_convert_to_karras` on the spacing's σs).
    Model timesteps (steps,): `timesteps` as a LongTensor, or for Karras σs float t interpolated in log σ.
    ᾱ = 0 (zero terminal SNR) is read as 2⁻²⁴, as `_step_table` does.
    """
    abar = torch.tensor([a for _, a, _ in _step_table(alphas_cumprod, timesteps, 1.0)], dtype=torch.float64)
    sigmas = ((1 - abar) / abar).sqrt()
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), len(sigmas))
        model_t = sigma_to_t(sigmas[:-1], log_sigmas(alphas_cumprod)).float()
    else:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        model_t = timesteps.to("cpu", torch.long)
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"the ᾱ table gives σs that do not decrease on timesteps {timesteps.tolist()}")
    return sigmas, model_t


def dpmpp_2m_orders(steps: int) -> list[int]:
    """The order DPM++ 2M (and 2M SDE) uses at each of `steps` steps.

    1 at the first step (no earlier D) and at the last, which goes to σ = 0: there h = ∞, the 2M
    correction is undefined and the step is x ← D, as in k-diffusion and in diffusers with
    final_sigmas_type="zero" (which forces lower_order_final at every step count; diffusers' < 15-step
    rule only matters for a σ_min final σ or order 3, which we do not have). 2 in between.
    """
    return [1 if i in (0, steps - 1) else 2 for i in range(steps)]


# ----------------------------------------------------------------------------- shared loop parts


def _start(x: Tensor, alphas_cumprod: Tensor, timesteps: Tensor, karras: bool):
    """(x = σ_max·z in the step dtype, σs as floats, the model's t as (steps, B) rows, each step's t as a number)."""
    sigmas, model_t = sampling_sigmas(alphas_cumprod, timesteps, karras)
    t_rows = _timestep_batches(model_t, x)
    # x = σ_max·z as in Karras et al. 2022 (Algorithm 1, line 1) and k-diffusion. diffusers departs: its Euler
    # schedulers start from init_noise_sigma·z = √(σ_max²+1)·z under leading spacing (σ_max·z otherwise), and
    # DPM-Solver from the VP sample z, which is x = √(σ_max²+1)·z under every spacing.
    x = x.to(torch.promote_types(x.dtype, torch.float32)) * sigmas[0].item()
    return x, sigmas.tolist(), t_rows, model_t.tolist()


def _denoise(model: Model, x: Tensor, sigma: float, t: Tensor, model_dtype: torch.dtype) -> Tensor:
    """D = x − σ·ε̂, ε̂ = model(x/√(σ²+1), t): the VP ε-model as a σ-space denoiser (Karras et al. 2022, Table 1)."""
    eps = model((x / math.sqrt(sigma * sigma + 1)).to(model_dtype), t)
    return x - sigma * eps.to(x.dtype)


def _report(callback: Optional[Callback], i: int, t: float, x: Tensor, sigma_next: float) -> None:
    if callback is not None:
        callback(i, t, x / math.sqrt(sigma_next * sigma_next + 1))  # the VP sample, like DDIM's x_t


def _second_order_denoised(d: Tensor, d_prev: Tensor, sigma_prev: float, sigma: float, sigma_next: float) -> Tensor:
    """D' = (1 + 1/(2r))·D − 1/(2r)·D_prev, r = h_prev/h, λ = −log σ (Lu et al. 2022, Algorithm 2, the 2M update)."""
    r = math.log(sigma_prev / sigma) / math.log(sigma / sigma_next)
    return (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev


# ----------------------------------------------------------------------------- samplers


def euler(
    model: Model,
    x: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    generators: Optional[Sequence[torch.Generator]] = None,
    callback: Optional[Callback] = None,
    karras: bool = False,
) -> Tensor:
    """Euler steps of the probability-flow ODE dx/dσ = (x − D)/σ (Karras et al. 2022, Algorithm 2, no churn)."""
    model_dtype = x.dtype
    x, sigmas, t_rows, ts = _start(x, alphas_cumprod, timesteps, karras)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = _denoise(model, x, sigma, t_rows[i], model_dtype)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)  # d = (x − D)/σ; x ← x + d·(σ_next − σ)
        _report(callback, i, ts[i], x, sigma_next)
    return x.to(model_dtype)


def euler_ancestral(
    model: Model,
    x: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    generators: Optional[Sequence[torch.Generator]] = None,
    callback: Optional[Callback] = None,
    karras: bool = False,
) -> Tensor:
    """Euler ancestral, η = 1: an Euler step to σ_down, then noise σ_up (k-diffusion's sample_euler_ancestral)."""
    model_dtype = x.dtype
    x, sigmas, t_rows, ts = _start(x, alphas_cumprod, timesteps, karras)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = _denoise(model, x, sigma, t_rows[i], model_dtype)
        # σ_up² + σ_down² = σ_next², with σ_up² the DDPM posterior variance (Ho et al. 2020, eq. 7) in σ-space
        sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:  # the last step adds no noise (σ_up = 0) and draws none
            x = x + sigma_up * randn_like_per_image(x, generators)
        _report(callback, i, ts[i], x, sigma_next)
    return x.to(model_dtype)


def dpmpp_2m(
    model: Model,
    x: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    generators: Optional[Sequence[torch.Generator]] = None,
    callback: Optional[Callback] = None,
    karras: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); the order of each step is dpmpp_2m_orders(steps)."""
    model_dtype = x.dtype
    x, sigmas, t_rows, ts = _start(x, alphas_cumprod, timesteps, karras)
    denoised_prev = None
    for i, order in enumerate(dpmpp_2m_orders(len(ts))):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, t_rows[i], model_dtype)
        if order == 2:
            target = _second_order_denoised(denoised, denoised_prev, sigmas[i - 1], sigma, sigma_next)
        else:
            target = denoised
        ratio = sigma_next / sigma  # e^{−h}
        x = ratio * x + (1 - ratio) * target  # (σ_next/σ)·x − expm1(−h)·D'
        denoised_prev = denoised
        _report(callback, i, ts[i], x, sigma_next)
    return x.to(model_dtype)


def dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    generators: Optional[Sequence[torch.Generator]] = None,
    callback: Optional[Callback] = None,
    karras: bool = False,
) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint (Lu et al. 2022's DPM-Solver++ for the reverse SDE, diffusers #3344), η = 1."""
    model_dtype = x.dtype
    x, sigmas, t_rows, ts = _start(x, alphas_cumprod, timesteps, karras)
    denoised_prev = None
    for i, order in enumerate(dpmpp_2m_orders(len(ts))):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, t_rows[i], model_dtype)
        if order == 2:
            target = _second_order_denoised(denoised, denoised_prev, sigmas[i - 1], sigma, sigma_next)
        else:
            target = denoised
        decay = (sigma_next / sigma) ** 2  # e^{−2h}
        # x ← (σ_next/σ)·e^{−h}·x + (1 − e^{−2h})·D' + σ_next·√(1 − e^{−2h})·z
        x = decay * x + (1 - decay) * target
        if sigma_next > 0:  # the last step is x ← D and draws no noise
            x = x + sigma_next * math.sqrt(1 - decay) * randn_like_per_image(x, generators)
        denoised_prev = denoised
        _report(callback, i, ts[i], x, sigma_next)
    return x.to(model_dtype)
