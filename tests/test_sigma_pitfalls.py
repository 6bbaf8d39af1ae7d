"""σ-space samplers: the pitfalls users of diffusers and the web UIs have hit, one test each."""

import math

import pytest
import torch

from diffusion.samplers import alpha_bar_at, epsilon_from_v, log_sigmas, randn_like_per_image
from diffusion.sigma_samplers import dpmpp_2m, dpmpp_2m_orders, karras_sigmas, sampling_sigmas, sigma_to_t
from test_sigma_samplers import SAMPLERS, SHAPE, SPACINGS, STOCHASTIC, generators, noise_schedule, randn, timesteps_for, toy_eps

@pytest.mark.parametrize("n", list(range(1, 61)) + [100, 250, 1000])
def test_karras_sigmas_count_terminal_and_order(n):
    sigmas = karras_sigmas(0.0292, 14.6146, n)
    assert len(sigmas) == n + 1 and sigmas[-1] == 0 and (sigmas[:-1] > 0).all()  # exactly one terminal 0
    assert (sigmas[1:] < sigmas[:-1]).all()  # strictly decreasing: no repeated last σ (diffusers #6477)
    assert sigmas[0].item() == pytest.approx(14.6146, rel=1e-12)
    if n > 1:
        assert sigmas[-2].item() == pytest.approx(0.0292, rel=1e-12)
    if n == 5:  # σ_i^{1/7} evenly spaced (Karras et al. 2022, eq. 5)
        gaps = (sigmas[:-1] ** (1 / 7)).diff()
        torch.testing.assert_close(gaps, torch.full_like(gaps, (0.0292 ** (1 / 7) - 14.6146 ** (1 / 7)) / 4))


def test_karras_sigmas_reject_a_bad_range():
    for args in ((1.0, 1.0, 5), (0.0, 1.0, 5), (1.0, 0.5, 5), (0.1, 1.0, 0)):
        with pytest.raises(ValueError, match="Karras"):
            karras_sigmas(*args)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_sampling_sigmas_for_every_spacing_and_step_count(spacing, karras, zero_snr):
    abar = noise_schedule(zero_snr).alphas_cumprod
    log_sigma = log_sigmas(abar)
    for steps in (1, 2, 3, 4, 5, 7, 10, 14, 15, 16, 25, 50, 100, 999):
        timesteps = timesteps_for(spacing, steps)
        sigmas, model_t = sampling_sigmas(abar, timesteps, karras)
        assert len(sigmas) == steps + 1 and len(model_t) == steps
        assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all() and (sigmas[1:] < sigmas[:-1]).all()
        table = log_sigma[timesteps].exp()  # the spacing's own σs
        torch.testing.assert_close(sigmas[[0, -2]], table[[0, -1]], rtol=1e-12, atol=0)
        if karras:  # float t, σ(t) is the step's σ, within the spacing's range
            assert model_t.dtype == torch.float32 and (model_t[1:] <= model_t[:-1]).all()
            abar_t = alpha_bar_at(log_sigma, sigma_to_t(sigmas[:-1], log_sigma))
            torch.testing.assert_close(abar_t, 1 / (1 + sigmas[:-1] ** 2), rtol=1e-9, atol=0)
        else:
            assert torch.equal(model_t, timesteps)
            torch.testing.assert_close(sigmas[:-1], table, rtol=1e-12, atol=0)
    if zero_snr and spacing == "trailing":
        assert sigmas[0].item() == pytest.approx(4096, rel=1e-6)  # ᾱ = 2⁻²⁴ at t = T − 1, not 0


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 14, 15, 16, 25])
def test_dpmpp_2m_order_of_each_step(steps):
    orders = dpmpp_2m_orders(steps)
    assert orders == ([1] if steps == 1 else [1] + [2] * (steps - 2) + [1])
    # Read the order each step took from the run: a first-order step is x ← (σ'/σ)·x + (1 − σ'/σ)·D.
    abar = noise_schedule().alphas_cumprod
    timesteps = timesteps_for("leading", steps)
    sigmas = sampling_sigmas(abar, timesteps)[0].tolist()
    inputs, outputs = [], []

    def model(x_t, t):
        inputs.append((x_t, toy_eps(x_t, t)))
        return inputs[-1][1]

    out = dpmpp_2m(model, randn(*SHAPE), abar, timesteps, callback=lambda i, t, x: outputs.append(x))
    used = []
    for i, ((x_t, eps), x_next_t) in enumerate(zip(inputs, outputs)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, x_next = x_t * math.sqrt(sigma**2 + 1), x_next_t * math.sqrt(sigma_next**2 + 1)
        denoised = x - sigma * eps
        first = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised
        used.append(1 if torch.allclose(x_next, first, rtol=0, atol=1e-5 * x.abs().max().item()) else 2)
        if i == steps - 1:
            torch.testing.assert_close(out, denoised)  # the last step is x ← D
    assert used == orders


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name", STOCHASTIC)
def test_image_depends_on_its_seed_not_the_batch(name, karras):
    abar = noise_schedule().alphas_cumprod
    timesteps = timesteps_for("trailing", 8)

    def run(seeds):
        gens = generators(*seeds)
        x_T = randn_like_per_image(torch.empty(len(seeds), 4, 8, 8), gens)
        return SAMPLERS[name](toy_eps, x_T, abar, timesteps, generators=gens, karras=karras)

    batch, single = run([10, 11, 12]), run([11])
    torch.testing.assert_close(batch[1], single[0], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    # the noise comes from the generators: the same start with other seeds ends elsewhere
    x_T = randn_like_per_image(torch.empty(1, 4, 8, 8), generators(11))
    other = SAMPLERS[name](toy_eps, x_T, abar, timesteps, generators=generators(99), karras=karras)
    assert not torch.allclose(other, single)


def run_recording(name: str, spacing: str, steps: int, karras: bool) -> None:
    """One run that checks the model contract: t per image, long or (Karras) float; a callback per step."""
    timesteps, seen_t, calls = timesteps_for(spacing, steps), [], []

    def model(x_t, t):
        assert t.shape == (2,) and t.dtype == (torch.float32 if karras else torch.int64)
        seen_t.append(t[0].item())
        return toy_eps(x_t, t)

    out = SAMPLERS[name](model, randn(*SHAPE), noise_schedule().alphas_cumprod, timesteps, generators=generators(1, 2),
                         karras=karras, callback=lambda i, t, x: calls.append((i, t, x.shape)))
    assert torch.isfinite(out).all() and out.shape == SHAPE
    assert calls == [(i, t, torch.Size(SHAPE)) for i, t in enumerate(seen_t)]
    if not karras:
        assert seen_t == timesteps.tolist()
    assert seen_t[0] == pytest.approx(timesteps[0].item(), abs=1e-3)
    assert seen_t[-1] == pytest.approx(timesteps[-1].item(), abs=1e-3)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_spacing_and_step_count_runs_the_model_contract(name):
    for spacing in SPACINGS:
        for steps in (1, 2, 3, 7, 50):
            for karras in (False, True):
                run_recording(name, spacing, steps, karras)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_half_precision_models_and_bad_timesteps(name):
    abar = noise_schedule(zero_snr=True).alphas_cumprod
    dtypes = []

    def model(x_t, t):
        dtypes.append(x_t.dtype)
        return toy_eps(x_t.float(), t).to(x_t.dtype)

    out = SAMPLERS[name](model, randn(*SHAPE).to(torch.bfloat16), abar, timesteps_for("trailing", 5), karras=True)
    assert out.dtype == torch.bfloat16 and set(dtypes) == {torch.bfloat16} and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="strictly descending"):
        SAMPLERS[name](toy_eps, randn(*SHAPE), abar, torch.tensor([500, 500, 0]))


def test_epsilon_from_v_at_fractional_timesteps():
    schedule = noise_schedule()
    abar = schedule.alphas_cumprod
    x0, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    t = torch.tensor([3, 700])
    x_t, v = schedule.q_sample(x0, t, eps), schedule.velocity(x0, t, eps)
    model = epsilon_from_v(lambda x, t_: v, abar)
    # a float t on a table entry reads that entry, as the integer t does
    torch.testing.assert_close(model(x_t, t.float()), model(x_t, t), rtol=0, atol=1e-5)
    # between entries, ᾱ is 1/(1 + σ²) with log σ halfway
    log_sigma = log_sigmas(abar)
    half = alpha_bar_at(log_sigma, torch.tensor([3.5], dtype=torch.float64))
    want = 1 / (1 + ((log_sigma[3] + log_sigma[4]) / 2).exp() ** 2)
    torch.testing.assert_close(half, want.view(1))
    assert abar[4] < half.float() < abar[3]
