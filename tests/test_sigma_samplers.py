"""σ-space samplers: whole trajectories against diffusers, and closed forms (the pitfalls: test_sigma_pitfalls.py).

Where diffusers departs from the papers (or from itself), the reference is set up to sample on our
schedule, and `test_where_diffusers_departs` pins down each departure, so a diffusers upgrade that
changes one shows up here:
- Starting noise. Karras et al. 2022 (Algorithm 1, line 1) and k-diffusion start from x = σ_max·z, and so
  do we. diffusers' Euler schedulers start from init_noise_sigma·z, which is √(σ_max²+1)·z under leading
  spacing but σ_max·z under linspace and trailing; DPM-Solver starts its VP sample at z, i.e. x = √(σ_max²+1)·z.
  √(σ_max²+1) is the exact spread of x at σ_max for unit-variance data and σ_max the paper's approximation
  of it; they differ by 0.2% at SD's σ_max = 14.6, and diffusers' choice hangs on the spacing, which has
  nothing to do with it. The references below start from our x.
- Linspace timesteps. diffusers' Euler schedulers keep linspace's fractional timesteps (999·k/(N − 1))
  and interpolate σ linearly in t; its DDIM rounds them, and so does schedule.inference_timesteps, so that
  a spacing means the same timesteps for every sampler. Where they are fractional, the references get ours.
- DPM-Solver's own spacing: leading uses T//(N + 1) and linspace N + 1 points without the last. Not a
  paper question, just a different table; the reference gets our timesteps.
- DPM-Solver with Karras σs takes σ_max and σ_min from the whole training table, whatever the spacing and
  steps_offset (its Euler takes them from the spacing's timesteps, as we do), and rounds the timesteps it
  gives the network while the update uses the unrounded σ: the network is asked about a σ other than the
  one the solver steps from, and from 50 steps on two steps share a timestep. Ours passes the float t whose
  σ is the step's, which is right: the ODE's slope at σ is (x − D(x; σ))/σ, with D at that same σ.
  The DPM Karras references run on linspace, whose ends are the table's, and call the
  network at diffusers' own unrounded t.
- Euler ancestral has no Karras σs in diffusers; its Karras reference borrows the Euler scheduler's σ table
  (the ancestral step is what is under test).
- diffusers' ancestral and SDE schedulers also draw noise for the last step and multiply it by 0; we draw
  none there. The images agree; only a generator reused after sampling would differ.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from diffusion.config import ScheduleConfig
from diffusion.samplers import alpha_bar_at, ddim, ddpm, epsilon_from_v, log_sigmas, randn_like_per_image
from diffusion.schedule import NoiseSchedule, inference_timesteps
from diffusion.sigma_samplers import (
    dpmpp_2m,
    dpmpp_2m_sde,
    euler,
    euler_ancestral,
    sampling_sigmas,
)

T = 1000
SHAPE = (2, 4, 8, 8)
SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde}
STOCHASTIC = ("euler_ancestral", "dpmpp_2m_sde")
SPACINGS = {"leading": 1, "trailing": 0, "linspace": 0}  # spacing -> steps_offset (SD uses 1 with leading)


def noise_schedule(zero_snr: bool = False, name: str = "scaled_linear") -> NoiseSchedule:
    start, end = (0.00085, 0.012) if name == "scaled_linear" else (1e-4, 0.02)
    return NoiseSchedule(ScheduleConfig(T, name, start, end, zero_snr))


def timesteps_for(spacing: str, steps: int) -> torch.Tensor:
    return inference_timesteps(T, steps, spacing, SPACINGS[spacing])


def toy_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, timestep-dependent stand-in for a trained network; t may be fractional."""
    return torch.tanh(x_t) * (0.5 + t.float().view(-1, 1, 1, 1) / T)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def assert_matches(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal to `tol` relative to the tensor's scale (absolute below 1)."""
    torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


# ----------------------------------------------------------------------------- the diffusers oracle


def diffusers_config(spacing: str, zero_snr: bool, prediction_type: str = "epsilon") -> dict:
    return dict(
        num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        timestep_spacing=spacing, steps_offset=SPACINGS[spacing], rescale_betas_zero_snr=zero_snr,
        prediction_type=prediction_type,
    )


def euler_scheduler(cfg: dict, spacing: str, steps: int, karras: bool) -> EulerDiscreteScheduler:
    ref = EulerDiscreteScheduler(**cfg, use_karras_sigmas=karras)
    if spacing == "linspace" and not karras:  # diffusers would keep linspace's fractional timesteps
        ref.set_timesteps(timesteps=timesteps_for(spacing, steps).tolist())
    else:
        ref.set_timesteps(steps)
    return ref


def reference_trajectory(name, z, spacing, steps, karras, zero_snr, prediction_type="epsilon", seeds=(5, 6)):
    """diffusers' samples after each step, as VP samples x/√(σ_next²+1) (what our callback reports)."""
    cfg, gens, net = diffusers_config(spacing, zero_snr, prediction_type), generators(*seeds), toy_eps
    trajectory = []
    if name.startswith("euler"):
        ref = euler_scheduler(cfg, spacing, steps, karras)
        if name == "euler_ancestral":
            donor, ref = ref, EulerAncestralDiscreteScheduler(**cfg)
            ref.set_timesteps(steps)
            if karras or spacing == "linspace":  # no Karras σs, no custom timesteps: borrow Euler's table
                ref.timesteps, ref.sigmas = donor.timesteps, donor.sigmas
            torch.testing.assert_close(ref.sigmas, donor.sigmas)
        x = z * ref.sigmas[0]  # our σ_max·z, not init_noise_sigma·z
        for i, t in enumerate(ref.timesteps):
            x = ref.step(net(ref.scale_model_input(x, t), t.expand(len(x))), t, x, generator=gens).prev_sample
            trajectory.append(x / (ref.sigmas[i + 1] ** 2 + 1) ** 0.5)
        return trajectory
    algorithm = "dpmsolver++" if name == "dpmpp_2m" else "sde-dpmsolver++"
    ref = DPMSolverMultistepScheduler(**cfg, algorithm_type=algorithm, solver_order=2, use_karras_sigmas=karras)
    ref.set_timesteps(steps) if karras else ref.set_timesteps(timesteps=timesteps_for(spacing, steps).tolist())
    log_sigmas_ref = np.log((((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5).numpy())  # as diffusers has it
    sigma_max = ref.sigmas[0]
    x = z * sigma_max / (sigma_max**2 + 1) ** 0.5  # the VP sample of our σ_max·z, not z
    for i, t in enumerate(ref.timesteps):
        # the network at diffusers' own unrounded t for this σ; its rounded t would ask about another σ
        t_net = torch.tensor(float(ref._sigma_to_t(np.array(ref.sigmas[i].item()), log_sigmas_ref))) if karras else t
        x = ref.step(net(x, t_net.expand(len(x))), t, x, generator=gens).prev_sample
        trajectory.append(x)
    return trajectory


def our_trajectory(name, z, spacing, steps, karras, zero_snr, prediction_type="epsilon", seeds=(5, 6)):
    abar = noise_schedule(zero_snr).alphas_cumprod
    model = epsilon_from_v(toy_eps, abar) if prediction_type == "v_prediction" else toy_eps
    trajectory = []
    out = SAMPLERS[name](
        model, z, abar, timesteps_for(spacing, steps), generators=generators(*seeds), karras=karras,
        callback=lambda i, t, x: trajectory.append(x),
    )
    torch.testing.assert_close(trajectory[-1], out, rtol=0, atol=0)  # σ = 0 at the end: the VP sample is x
    return trajectory


ORACLE_CASES = [
    (name, spacing, steps, karras, False, "epsilon")
    for name in SAMPLERS
    for spacing in SPACINGS
    for steps in (5, 10, 25)
    for karras in (False, True)
    if not (karras and name.startswith("dpmpp") and spacing != "linspace")  # DPM Karras: the table's ends
] + [  # zero terminal SNR (ᾱ_T read as 2⁻²⁴ by both), for an ε model and through epsilon_from_v for a v model
    (name, "linspace" if karras and name.startswith("dpmpp") else "trailing", 10, karras, True, prediction_type)
    for name in SAMPLERS
    for karras in (False, True)
    for prediction_type in ("epsilon", "v_prediction")
]


@pytest.mark.parametrize("name, spacing, steps, karras, zero_snr, prediction_type", ORACLE_CASES)
def test_trajectory_matches_diffusers(name, spacing, steps, karras, zero_snr, prediction_type):
    z = randn(*SHAPE, seed=steps)
    want = reference_trajectory(name, z, spacing, steps, karras, zero_snr, prediction_type)
    got = our_trajectory(name, z, spacing, steps, karras, zero_snr, prediction_type)
    assert len(got) == len(want) == steps
    for got_x, want_x in zip(got, want):
        assert_matches(got_x, want_x)


def test_where_diffusers_departs():
    """Each departure listed in the module docstring, as diffusers has it today."""
    cfg = diffusers_config("leading", zero_snr=False)
    # Starting noise: √(σ_max²+1) for leading, σ_max for trailing (Euler); z in VP space (DPM-Solver).
    for spacing, scale in (("leading", lambda s: (s**2 + 1) ** 0.5), ("trailing", lambda s: s)):
        ref = EulerDiscreteScheduler(**diffusers_config(spacing, False))
        ref.set_timesteps(10)
        torch.testing.assert_close(torch.as_tensor(ref.init_noise_sigma), scale(ref.sigmas[0]))
    assert DPMSolverMultistepScheduler(**cfg).init_noise_sigma == 1.0
    # Euler keeps fractional linspace timesteps; DPM-Solver spaces its own way.
    ref = EulerDiscreteScheduler(**diffusers_config("linspace", False))
    ref.set_timesteps(5)
    assert ref.timesteps[1].item() == pytest.approx(749.25) and timesteps_for("linspace", 5)[1] == 749
    ref = DPMSolverMultistepScheduler(**cfg)
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() != timesteps_for("leading", 10).tolist()  # T//11 steps, not T//10
    # DPM-Solver's Karras σs span the whole table under leading spacing (Euler's: the spacing's σs), and
    # its network timesteps are rounded, repeating from 50 steps on.
    abar = noise_schedule().alphas_cumprod
    ours, _ = sampling_sigmas(abar, timesteps_for("leading", 10), karras=True)  # from σ at t = 901
    table_max = log_sigmas(abar)[-1].exp().item()  # σ at t = 999
    for scheduler, sigma_max in ((DPMSolverMultistepScheduler, table_max), (EulerDiscreteScheduler, ours[0].item())):
        ref = scheduler(**cfg, use_karras_sigmas=True)
        ref.set_timesteps(10)
        assert ref.sigmas[0].item() == pytest.approx(sigma_max, rel=1e-5)
    ref = DPMSolverMultistepScheduler(**cfg, use_karras_sigmas=True)
    ref.set_timesteps(50)
    assert ref.timesteps.dtype == torch.int64 and len(set(ref.timesteps.tolist())) < 50
    _, model_t = sampling_sigmas(abar, timesteps_for("linspace", 50), karras=True)
    assert model_t.is_floating_point() and (model_t[1:] < model_t[:-1]).all()


# ----------------------------------------------------------------------------- closed forms


def gaussian_data_model(abar: torch.Tensor, mu: float, s: float):
    """The exact ε for data x0 ~ N(μ, s²I), at integer or fractional t.

    In σ-space x = x0 + σ·ε ~ N(μ, s² + σ²), so D(x, σ) = E[x0 | x] = μ + s²/(s² + σ²)·(x − μ) and
    ε = (x − D)/σ = σ·(x − μ)/(s² + σ²); the network sees x_t = x/√(σ²+1).
    """
    log_sigma = log_sigmas(abar)

    def model(x_t, t):
        a = alpha_bar_at(log_sigma, t.double().cpu()).view(-1, 1, 1, 1).to(x_t.device)
        sigma = ((1 - a) / a).sqrt()
        x = x_t.double() * (sigma**2 + 1).sqrt()
        return (sigma * (x - mu) / (s**2 + sigma**2)).to(x_t.dtype)

    return model


def test_deterministic_samplers_converge_at_their_order():
    # The probability-flow ODE dx/dσ = (x − D)/σ keeps (x − μ)/√(s² + σ²) constant, so from x_T = σ_max·z
    # x(σ) = μ + (x_T − μ)·√(s² + σ²)/√(s² + σ_max²). The last step maps x(σ_min) to D(x(σ_min), σ_min) for
    # every sampler, and D(x(σ_min)) is not x(0) whatever N, so the reference is D(x(σ_min), σ_min).
    # Everything is affine in x_T, so the relative error is one number per run. Karras σs on linspace
    # spacing keep σ_max and σ_min fixed as N grows (trailing's σ_min moves with N and hides the order).
    mu, s = 0.5, 1.0  # unit-variance data, like SD's scaled latents
    abar = noise_schedule().alphas_cumprod
    model, z = gaussian_data_model(abar, mu, s), randn(1, 1, 4, 4, dtype=torch.float64)
    errors = {}
    for name in ("euler", "dpmpp_2m"):
        for steps in (5, 10, 20, 40):
            timesteps = timesteps_for("linspace", steps)
            sigmas, _ = sampling_sigmas(abar, timesteps, karras=True)
            sigma_max, sigma_min = sigmas[0].item(), sigmas[-2].item()
            exact = mu + (sigma_max * z - mu) * s**2 / math.sqrt((s**2 + sigma_min**2) * (s**2 + sigma_max**2))
            out = SAMPLERS[name](model, z, abar, timesteps, karras=True)  # float64 throughout
            errors[name, steps] = ((out - exact).norm() / (exact - mu).norm()).item()

    def order(name, n):  # the observed order from n to 2n steps
        return math.log2(errors[name, n] / errors[name, 2 * n])

    for n in (5, 10, 20):
        assert 0.9 < order("euler", n) < 1.1, errors
    # DPM++ 2M is second order from 10 steps on; at 5 steps its λ-steps (h ≈ 1.5) are not yet asymptotic.
    for n in (10, 20):
        assert 1.8 < order("dpmpp_2m", n) < 2.3, errors
        assert errors["dpmpp_2m", n] < errors["euler", n] / 2
    assert errors["dpmpp_2m", 40] < 1e-2


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("karras", [False, True])
def test_exact_model_of_a_point_recovers_it(name, karras):
    # For data that is the single point x*, D = x* at every σ: each sampler's last step lands on it.
    abar = noise_schedule().alphas_cumprod
    log_sigma, x_star = log_sigmas(abar), randn(*SHAPE, seed=42)

    def point(x_t, t):  # ε = (x_t − √ᾱ·x*)/√(1−ᾱ)
        a = alpha_bar_at(log_sigma, t.double()).view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x_star) / (1 - a).sqrt()).float()

    timesteps = timesteps_for("trailing", 7)
    out = SAMPLERS[name](point, randn(*SHAPE), abar, timesteps, generators=generators(1, 2), karras=karras)
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "name, karras, steps",
    # Euler ancestral is DDPM's ancestral sampler, whose variance is biased at first order in the step
    # (−8% at 100 steps here, −1% at 1000); the 2M SDE sampler's bias is ~1% from 100 Karras steps.
    [("euler_ancestral", False, 1000), ("dpmpp_2m_sde", True, 100), ("dpmpp_2m_sde", False, 200)],
)
def test_stochastic_samplers_reproduce_the_data_distribution(name, karras, steps):
    mu, s, n = 0.5, 1.0, 4096
    abar = noise_schedule().alphas_cumprod
    model = gaussian_data_model(abar, mu, s)
    gens = generators(3)
    z = randn_like_per_image(torch.empty(1, 4, 32, 32), gens)  # 4096 draws, one per element
    out = SAMPLERS[name](model, z, abar, timesteps_for("linspace", steps), generators=gens, karras=karras)
    assert abs(out.mean().item() - mu) < 4 * s / math.sqrt(n)
    assert abs(out.var().item() - s**2) < 4 * s**2 * math.sqrt(2 / n)


def test_first_order_steps_are_the_classic_samplers():
    # Euler in σ-space is DDIM η = 0 (Song et al. 2021, sec. 4.3), and Euler ancestral is DDPM's ancestral
    # step; DPM-Solver++ and its SDE form at first order are the same two (Lu et al. 2022), so
    # with 2 steps (orders [1, 1]) DPM++ 2M is Euler and 2M SDE is Euler ancestral.
    abar, z = noise_schedule().alphas_cumprod, randn(*SHAPE)
    for spacing in SPACINGS:
        timesteps = timesteps_for(spacing, 10)
        sigma_max = sampling_sigmas(abar, timesteps)[0][0].item()
        x_T = z * sigma_max / math.sqrt(sigma_max**2 + 1)  # the VP sample of x = σ_max·z
        assert_matches(euler(toy_eps, z, abar, timesteps), ddim(toy_eps, x_T, abar, timesteps), 1e-5)
        got = euler_ancestral(toy_eps, z, abar, timesteps, generators=generators(1, 2))
        assert_matches(got, ddpm(toy_eps, x_T, abar, timesteps, generators=generators(1, 2)), 1e-5)
    timesteps = timesteps_for("trailing", 2)
    assert_matches(dpmpp_2m(toy_eps, z, abar, timesteps), euler(toy_eps, z, abar, timesteps), 1e-6)
    got = dpmpp_2m_sde(toy_eps, z, abar, timesteps, generators=generators(1, 2))
    assert_matches(got, euler_ancestral(toy_eps, z, abar, timesteps, generators=generators(1, 2)), 1e-6)
