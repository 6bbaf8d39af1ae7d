"""Samplers against diffusers' DDIM/DDPM schedulers, closed forms, per-image seeds and guidance."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion.config import ScheduleConfig
from diffusion.samplers import (
    classifier_free_guidance,
    conditional,
    ddim,
    ddim_step,
    ddpm,
    ddpm_step,
    epsilon_from_v,
    predict_x0,
    randn_like_per_image,
)
from diffusion.schedule import NoiseSchedule, inference_timesteps

T = 1000
SHAPE = (2, 4, 8, 8)
SCHEDULES = {  # ours -> (diffusers' name, beta_start, beta_end)
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 0.00085, 0.012),
}
SPACINGS = ["leading", "trailing", "linspace"]


def noise_schedule(name: str, zero_terminal_snr: bool = False) -> NoiseSchedule:
    _, start, end = SCHEDULES[name]
    return NoiseSchedule(ScheduleConfig(T, name, start, end, zero_terminal_snr))


def diffusers_kwargs(name: str, spacing: str, steps_offset: int = 0) -> dict:
    diffusers_name, start, end = SCHEDULES[name]
    return dict(
        num_train_timesteps=T, beta_schedule=diffusers_name, beta_start=start, beta_end=end,
        clip_sample=False, timestep_spacing=spacing, steps_offset=steps_offset,
    )


def toy_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A per-image, timestep-dependent stand-in for a trained noise predictor."""
    return torch.tanh(x_t) * (0.5 + t.float().view(-1, 1, 1, 1) / T)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_matches(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal to `tol` relative to the output's scale (absolute below 1): at cosine's t = 999,
    ᾱ = 2.4e-9 makes x̂0 ~ 1e4, where one float32 ulp is already ~1e-3."""
    torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


# ----------------------------------------------------------------------------- single steps


def test_predict_x0_inverts_q_sample():
    schedule = noise_schedule("scaled_linear")
    x0, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    for t in (0, 500, 999):
        x_t = schedule.q_sample(x0, torch.tensor([t, t]), eps)
        torch.testing.assert_close(predict_x0(x_t, eps, schedule.alphas_cumprod[t]), x0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_step_matches_diffusers(name, spacing, eta, set_alpha_to_one):
    ref = DDIMScheduler(**diffusers_kwargs(name, spacing), set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(7)  # 7 does not divide 1000: trailing/linspace steps are uneven
    abar, final = ref.alphas_cumprod, ref.final_alpha_cumprod
    for i, t in enumerate(ref.timesteps.tolist()):  # the last t reaches the final ᾱ
        x_t, eps, noise = randn(*SHAPE, seed=3 * i), randn(*SHAPE, seed=3 * i + 1), randn(*SHAPE, seed=3 * i + 2)
        want = ref.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
        # diffusers' DDIM steps to t − T//N whatever the spacing; give ddim_step that same ᾱ_prev.
        prev = t - T // 7
        abar_prev = abar[prev] if prev >= 0 else final
        for a_t, a_prev in ((abar[t].item(), abar_prev.item()), (abar[t], abar_prev)):  # floats and 0-d tensors
            got = ddim_step(x_t, eps, a_t, a_prev, eta=eta, noise=noise)
            assert_matches(got, want)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddpm_step_matches_diffusers(name, spacing):
    ref = DDPMScheduler(**diffusers_kwargs(name, spacing), variance_type="fixed_small")
    ref.set_timesteps(7)
    timesteps = ref.timesteps.tolist()
    abar = ref.alphas_cumprod
    for i, t in enumerate(timesteps):
        x_t, eps = randn(*SHAPE, seed=2 * i), randn(*SHAPE, seed=2 * i + 1)
        # diffusers draws its noise as torch.randn(shape, generator=g); replay that draw.
        want = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        noise = randn(*SHAPE, seed=100 + i) if t > 0 else None
        abar_prev = abar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        got = ddpm_step(x_t, eps, abar[t].item(), abar_prev, noise)
        assert_matches(got, want)


def test_ddpm_step_mean_and_variance_are_the_posterior():
    """With ᾱ_prev at the previous training step the respaced step is DDPM's eq. 7 exactly."""
    schedule = noise_schedule("linear")
    t = 400
    abar_t, abar_prev = schedule.alphas_cumprod[t].item(), schedule.alphas_cumprod[t - 1].item()
    beta, alpha = schedule.betas[t].item(), schedule.alphas[t].item()
    x_t, eps, z = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    x0 = predict_x0(x_t, eps, abar_t)
    mean = abar_prev**0.5 * beta / (1 - abar_t) * x0 + alpha**0.5 * (1 - abar_prev) / (1 - abar_t) * x_t
    var = beta * (1 - abar_prev) / (1 - abar_t)
    torch.testing.assert_close(ddpm_step(x_t, eps, abar_t, abar_prev), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ddpm_step(x_t, eps, abar_t, abar_prev, z), mean + var**0.5 * z, rtol=0, atol=1e-5)


def test_ddim_eta_one_has_ddpm_variance():
    # Song et al. 2021, sec. 4.1: η = 1 gives the DDPM posterior's variance, so equal noise terms.
    x_t, eps, z = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    abar_t, abar_prev = 0.3, 0.6
    ddim_noise = ddim_step(x_t, eps, abar_t, abar_prev, 1.0, z) - ddim_step(x_t, eps, abar_t, abar_prev, 1.0)
    ddpm_noise = ddpm_step(x_t, eps, abar_t, abar_prev, z) - ddpm_step(x_t, eps, abar_t, abar_prev)
    torch.testing.assert_close(ddim_noise, ddpm_noise)


def test_steps_accept_per_sample_alphas():
    x_t, eps, z = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    abar_t, abar_prev = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.9])
    per_sample = (abar_t.view(-1, 1, 1, 1), abar_prev.view(-1, 1, 1, 1))
    for step in (lambda a, p: ddim_step(x_t, eps, a, p, 1.0, z), lambda a, p: ddpm_step(x_t, eps, a, p, z)):
        batched = step(*per_sample)
        for b in range(2):
            torch.testing.assert_close(batched[b], step(abar_t[b].item(), abar_prev[b].item())[b])


# ----------------------------------------------------------------------------- whole loops


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_loop_matches_diffusers(eta, set_alpha_to_one):
    # leading spacing: there diffusers' t − T//N is the next timestep, as in our loop.
    kwargs = diffusers_kwargs("scaled_linear", "leading", steps_offset=1)
    ref = DDIMScheduler(**kwargs, set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(10)
    x_T = randn(*SHAPE, seed=0)
    x, ref_generators = x_T, [torch.Generator().manual_seed(s) for s in (5, 6)]
    for t in ref.timesteps:
        noise = randn_like_per_image(x, ref_generators)
        x = ref.step(toy_eps(x, t.expand(2)), t, x, eta=eta, variance_noise=noise).prev_sample

    schedule = noise_schedule("scaled_linear")
    timesteps = inference_timesteps(T, 10, "leading", steps_offset=1)
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    got = ddim(
        toy_eps, x_T, schedule.alphas_cumprod, timesteps, eta=eta, final_alpha_cumprod=final, generators=generators
    )
    torch.testing.assert_close(got, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_loop_matches_diffusers(spacing):
    ref = DDPMScheduler(**diffusers_kwargs("scaled_linear", spacing))
    ref.set_timesteps(10)
    x_T = randn(*SHAPE, seed=0)
    # diffusers draws per-image noise from a list of generators exactly as randn_like_per_image does.
    x, ref_generators = x_T, [torch.Generator().manual_seed(s) for s in (5, 6)]
    for t in ref.timesteps:
        x = ref.step(toy_eps(x, t.expand(2)), t, x, generator=ref_generators).prev_sample

    schedule = noise_schedule("scaled_linear")
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    got = ddpm(toy_eps, x_T, schedule.alphas_cumprod, inference_timesteps(T, 10, spacing), generators=generators)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-4)


def point_mass_oracle(schedule: NoiseSchedule, x_star: torch.Tensor):
    """The exact ε for data that is the single point x*: ε = (x_t − √ᾱ_t·x*)/√(1−ᾱ_t)."""
    abar = schedule.alphas_cumprod.double()

    def model(x_t, t):
        a = abar[t].view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x_star.double()) / (1 - a).sqrt()).float()

    return model


@pytest.mark.parametrize(
    "sampler, name, spacing",
    [("ddim0", "scaled_linear", "leading"), ("ddim1", "cosine", "trailing"), ("ddim1", "linear", "linspace"),
     ("ddpm", "scaled_linear", "trailing"), ("ddpm", "cosine", "leading")],
)
def test_exact_eps_recovers_the_data_point(sampler, name, spacing):
    schedule = noise_schedule(name)
    x_star = randn(*SHAPE, seed=42)
    model = point_mass_oracle(schedule, x_star)
    timesteps = inference_timesteps(T, 20, spacing)
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    x_T = randn_like_per_image(x_star, generators)
    if sampler == "ddpm":
        x0 = ddpm(model, x_T, schedule.alphas_cumprod, timesteps, generators=generators)
    else:
        eta = float(sampler[-1])
        x0 = ddim(model, x_T, schedule.alphas_cumprod, timesteps, eta=eta, generators=generators)
    torch.testing.assert_close(x0, x_star, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_image_depends_on_its_seed_not_the_batch(sampler):
    schedule = noise_schedule("scaled_linear")
    timesteps = inference_timesteps(T, 8, "trailing")
    kwargs = {"eta": 1.0} if sampler == "ddim" else {}
    sample = ddim if sampler == "ddim" else ddpm

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x_T = randn_like_per_image(torch.empty(len(seeds), 4, 8, 8), generators)
        return sample(toy_eps, x_T, schedule.alphas_cumprod, timesteps, generators=generators, **kwargs)

    batch, single = run([10, 11, 12]), run([11])
    torch.testing.assert_close(batch[1], single[0], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_zero_terminal_snr_sampling_stays_finite():
    # Trailing spacing starts at t = T − 1 where ᾱ = 0; x̂0 = (x_t − ε)/√ᾱ would be inf.
    schedule = noise_schedule("scaled_linear", zero_terminal_snr=True)
    timesteps = inference_timesteps(T, 10, "trailing")
    x_T = randn(*SHAPE, seed=0)
    for sample in (ddim, ddpm):
        assert torch.isfinite(sample(toy_eps, x_T, schedule.alphas_cumprod, timesteps)).all()


def test_loop_callback_and_model_inputs():
    schedule = noise_schedule("linear")
    timesteps = inference_timesteps(T, 4, "leading")
    seen_t, calls = [], []

    def model(x_t, t):
        assert t.dtype == torch.int64 and t.shape == (2,)
        seen_t.append(t[0].item())
        return toy_eps(x_t, t)

    callback = lambda i, t, x: calls.append((i, t, x.shape))  # noqa: E731
    ddim(model, randn(*SHAPE), schedule.alphas_cumprod, timesteps, callback=callback)
    assert seen_t == timesteps.tolist() == [750, 500, 250, 0]
    assert calls == [(i, t, torch.Size(SHAPE)) for i, t in enumerate(seen_t)]


@pytest.mark.parametrize("timesteps", [[0, 500], [999, 999], [1000, 0], [5, -1], []])
def test_loops_reject_bad_timesteps(timesteps):
    with pytest.raises(ValueError, match="strictly descending"):
        ddim(toy_eps, randn(*SHAPE), noise_schedule("linear").alphas_cumprod, torch.tensor(timesteps, dtype=torch.long))


def test_randn_like_per_image():
    x = torch.empty(3, 2, 4, 4, dtype=torch.bfloat16)
    noise = randn_like_per_image(x, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert noise.shape == x.shape and noise.dtype == torch.bfloat16
    # the draw is float32 whatever x's dtype, so a seed gives the same image in bf16 and fp32
    torch.testing.assert_close(noise[1], randn(2, 4, 4, seed=2).to(torch.bfloat16))
    assert randn_like_per_image(x, None).shape == x.shape
    with pytest.raises(ValueError, match="one generator per image"):
        randn_like_per_image(x, [torch.Generator()])


# ----------------------------------------------------------------------------- guidance


class ContextNet:
    """A fake conditional net, ε = x·mean(context) + t/T, that counts its calls."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x_t, t, context):
        self.batch_sizes.append(x_t.shape[0])
        return x_t * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / T


def test_classifier_free_guidance():
    x, t = randn(*SHAPE), torch.tensor([10, 700])
    cond, uncond = randn(2, 3, 5, seed=1), randn(2, 3, 5, seed=2)
    eps_c, eps_u = ContextNet()(x, t, cond), ContextNet()(x, t, uncond)

    for scale, want in ((0.0, eps_u), (1.0, eps_c), (7.5, eps_u + 7.5 * (eps_c - eps_u))):
        net = ContextNet()
        torch.testing.assert_close(classifier_free_guidance(net, cond, uncond, scale)(x, t), want)
        assert net.batch_sizes == ([2] if scale == 1.0 else [4])  # one call per step, batched when guided


def test_guidance_broadcasts_a_single_uncond_context_and_conditional_wrapper():
    x, t = randn(*SHAPE), torch.tensor([10, 700])
    cond, uncond = randn(2, 3, 5, seed=1), randn(1, 3, 5, seed=2)
    net = ContextNet()
    got = classifier_free_guidance(net, cond, uncond, 3.0)(x, t)
    eps_c, eps_u = net(x, t, cond), net(x, t, uncond.expand(2, -1, -1))
    torch.testing.assert_close(got, eps_u + 3.0 * (eps_c - eps_u))
    torch.testing.assert_close(conditional(net, cond)(x, t), eps_c)
    with pytest.raises(ValueError, match="uncond_context"):
        classifier_free_guidance(net, cond, None, 3.0)


def test_guidance_prepares_the_context_once_for_every_step():
    x, t = randn(*SHAPE), torch.tensor([10, 700])
    cond, uncond = randn(2, 3, 5, seed=1), randn(1, 3, 5, seed=2)
    prepared = []

    def prepare(context):  # stands for UNet.prepare_context: any object net takes in place of the context
        prepared.append(context)
        return context * 2

    for scale, batch in ((3.0, 4), (1.0, 2)):
        net, prepared[:] = ContextNet(), []
        model = classifier_free_guidance(net, cond, uncond, scale, prepare=prepare)
        for _ in range(3):
            model(x, t)
        assert len(prepared) == 1 and prepared[0].shape[0] == batch  # the batched contexts, once
        plain = classifier_free_guidance(ContextNet(), cond * 2, uncond * 2, scale)(x, t)
        torch.testing.assert_close(model(x, t), plain)


# ----------------------------------------------------------------------------- v-prediction


@pytest.mark.parametrize("zero_snr, spacing", [(False, "leading"), (True, "trailing")], ids=["plain", "zero terminal SNR"])
def test_ddim_with_a_v_model_matches_diffusers_v_prediction(zero_snr, spacing):
    # diffusers converts v inside its scheduler; here the model is wrapped once and the sampler stays ε-only.
    # Under zero terminal SNR the first step has ᾱ = 0, where a v model's x0 is −v and ε carries no information.
    kwargs = diffusers_kwargs("scaled_linear", spacing, steps_offset=0 if zero_snr else 1)
    ref = DDIMScheduler(**kwargs, set_alpha_to_one=False, prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr)
    ref.set_timesteps(10)
    x = x_T = randn(*SHAPE, seed=0)
    for t in ref.timesteps:
        x = ref.step(toy_eps(x, t.expand(2)), t, x).prev_sample

    schedule = noise_schedule("scaled_linear", zero_terminal_snr=zero_snr)
    assert (schedule.alphas_cumprod[-1] == 0) == zero_snr
    model = epsilon_from_v(toy_eps, schedule.alphas_cumprod)
    got = ddim(model, x_T, schedule.alphas_cumprod, inference_timesteps(T, 10, spacing, kwargs["steps_offset"]),
               final_alpha_cumprod=schedule.alphas_cumprod[0])
    # At ᾱ = 0 we step from ᾱ = 2⁻²⁴ (samplers.ZERO_SNR_ALPHA_BAR), whose x0 is −v + 2⁻¹²·x_t.
    torch.testing.assert_close(got, x, rtol=0, atol=1e-3 if zero_snr else 1e-4)


def test_epsilon_from_v_recovers_the_noise():
    schedule = noise_schedule("linear")
    x0, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    t = torch.tensor([3, 700])
    x_t, v = schedule.q_sample(x0, t, eps), schedule.velocity(x0, t, eps)
    model = epsilon_from_v(lambda x, t_: v, schedule.alphas_cumprod)
    torch.testing.assert_close(model(x_t, t), eps, rtol=0, atol=1e-5)
