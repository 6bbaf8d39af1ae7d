"""Noise schedules, inference timesteps and the training objective, with diffusers as the oracle."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion.config import ScheduleConfig
from diffusion.schedule import (
    NoiseSchedule,
    diffusion_loss,
    inference_timesteps,
    loss_weights,
    make_betas,
)

T = 1000
# Our schedule name -> (diffusers' name, beta_start, beta_end)
SCHEDULES = {
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 0.00085, 0.012),  # cosine ignores beta_start/end
}


def schedule_config(name: str, zero_terminal_snr: bool = False) -> ScheduleConfig:
    _, start, end = SCHEDULES[name]
    return ScheduleConfig(T, name, start, end, zero_terminal_snr)


def diffusers_ddpm(name: str, zero_terminal_snr: bool = False) -> DDPMScheduler:
    diffusers_name, start, end = SCHEDULES[name]
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=diffusers_name,
        beta_start=start,
        beta_end=end,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


# ----------------------------------------------------------------------------- betas


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_diffusers(name, zero_terminal_snr):
    ours = NoiseSchedule(schedule_config(name, zero_terminal_snr))
    ref = diffusers_ddpm(name, zero_terminal_snr)
    for table in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, table).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, table), getattr(ref, table), rtol=0, atol=1e-6)
    assert ours.num_train_timesteps == T
    torch.testing.assert_close(make_betas(schedule_config(name, zero_terminal_snr)), ref.betas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_zero_terminal_snr_ends_at_pure_noise(name):
    plain = NoiseSchedule(schedule_config(name))
    rescaled = NoiseSchedule(schedule_config(name, zero_terminal_snr=True))
    assert rescaled.alphas_cumprod[-1] == 0 and rescaled.snr(T - 1) == 0
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0])  # ᾱ_0 kept (Alg. 1)
    assert (rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all()


def test_unknown_beta_schedule_is_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(ScheduleConfig(beta_schedule="sigmoid"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- forward process


def test_q_sample_closed_form_and_diffusers_add_noise():
    schedule = NoiseSchedule(schedule_config("scaled_linear"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, eps)
    for b in range(3):
        abar = schedule.alphas_cumprod[t[b]]
        torch.testing.assert_close(x_t[b], abar.sqrt() * x0[b] + (1 - abar).sqrt() * eps[b])
    torch.testing.assert_close(x_t, diffusers_ddpm("scaled_linear").add_noise(x0, eps, t))


def test_snr_and_to_device():
    schedule = NoiseSchedule(schedule_config("linear"))
    t = torch.tensor([0, 10, 999])
    abar = schedule.alphas_cumprod[t]
    torch.testing.assert_close(schedule.snr(t), abar / (1 - abar))
    assert (schedule.snr(torch.arange(T))[1:] < schedule.snr(torch.arange(T))[:-1]).all()
    assert schedule.to("cpu") is schedule


# ----------------------------------------------------------------------------- inference timesteps


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_match_diffusers_for_every_step_count(spacing, steps_offset):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    last = T - 1 if spacing == "leading" and steps_offset else T  # 1000 steps + offset 1 would reach t = 1000
    for steps in range(1, last + 1):
        ours = inference_timesteps(T, steps, spacing, steps_offset)
        ref.set_timesteps(steps)
        assert ours.dtype == torch.int64 and len(ours) == steps
        # diffusers' trailing uses a float np.arange whose length rounds up for some N (61, 103, ...),
        # appending a spurious t = -1; the first N values are the schedule.
        assert torch.equal(ours, ref.timesteps[:steps]), (spacing, steps_offset, steps)
        assert (ours[1:] < ours[:-1]).all() and 0 <= ours[-1] and ours[0] < T


def test_inference_timesteps_known_values():
    assert inference_timesteps(1000, 5, "leading", 1).tolist() == [801, 601, 401, 201, 1]
    assert inference_timesteps(1000, 5, "trailing").tolist() == [999, 799, 599, 399, 199]
    assert inference_timesteps(1000, 5, "linspace").tolist() == [999, 749, 500, 250, 0]


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_inference_timesteps_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        inference_timesteps(T, steps)


def test_inference_timesteps_rejects_offset_past_the_end_and_unknown_spacing():
    with pytest.raises(ValueError, match="steps_offset"):
        inference_timesteps(T, 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="spacing"):
        inference_timesteps(T, 10, "karras")


# ----------------------------------------------------------------------------- objective


class RecordingNet:
    """A fake noise predictor that records its inputs and returns a fixed function of them."""

    def __call__(self, x_t, t, context):
        self.x_t, self.t, self.context = x_t, t, context
        return 0.5 * x_t


def expected_loss(schedule, x0, seed, min_snr_gamma=None, offset_noise=0.0):
    """The objective written out by hand, replaying the generator's draws in the same order."""
    g = torch.Generator().manual_seed(seed)
    B, C = x0.shape[:2]
    t = torch.randint(0, T, (B,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    if offset_noise:
        eps = eps + offset_noise * torch.randn(B, C, 1, 1, generator=g)
    abar = schedule.alphas_cumprod[t].view(B, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    mse = ((0.5 * x_t - eps) ** 2).mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        snr = schedule.snr(t)
        mse = mse * torch.minimum(snr, torch.tensor(min_snr_gamma)) / snr
    return mse.mean(), t, x_t


@pytest.mark.parametrize("min_snr_gamma, offset_noise", [(None, 0.0), (5.0, 0.0), (None, 0.1), (1.0, 0.05)])
def test_diffusion_loss_matches_hand_computation(min_snr_gamma, offset_noise):
    schedule = NoiseSchedule(schedule_config("scaled_linear"))
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.zeros(6, 3, 5)
    net = RecordingNet()
    loss = diffusion_loss(
        net, schedule, x0, context,
        min_snr_gamma=min_snr_gamma, offset_noise=offset_noise, generator=torch.Generator().manual_seed(7),
    )
    want, t, x_t = expected_loss(schedule, x0, 7, min_snr_gamma, offset_noise)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, want)
    assert net.t.dtype == torch.int64 and torch.equal(net.t, t) and net.context is context
    torch.testing.assert_close(net.x_t, x_t)


def test_diffusion_loss_is_reproducible_with_a_generator():
    schedule = NoiseSchedule(schedule_config("linear"))
    x0 = torch.randn(4, 4, 8, 8)

    def loss(seed):
        return diffusion_loss(RecordingNet(), schedule, x0, None, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(loss(3), loss(3))
    assert not torch.equal(loss(3), loss(4))


def test_offset_noise_is_one_value_per_image_and_channel():
    # With x0 = 0, x_t/√(1−ᾱ_t) is the noise; minus the plain ε it leaves k·n, n of shape (B, C, 1, 1).
    schedule = NoiseSchedule(schedule_config("linear"))
    net = RecordingNet()
    x0 = torch.zeros(2, 3, 4, 4)
    diffusion_loss(net, schedule, x0, None, offset_noise=0.1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randint(0, T, (2,), generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    offset = net.x_t / (1 - schedule.alphas_cumprod[net.t]).sqrt().view(-1, 1, 1, 1) - eps
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset))  # constant over H, W
    assert offset[:, :, 0, 0].unique().numel() == 6  # but its own value for each image and channel
    torch.testing.assert_close(offset[:, :, :1, :1], 0.1 * torch.randn(2, 3, 1, 1, generator=g))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_min_snr_weights(zero_terminal_snr):
    schedule = NoiseSchedule(schedule_config("scaled_linear", zero_terminal_snr))
    t = torch.arange(T)
    snr = schedule.snr(t)
    w = loss_weights(schedule, t, 5.0)
    finite = snr > 0
    torch.testing.assert_close(w[finite], torch.minimum(snr, torch.tensor(5.0))[finite] / snr[finite])
    assert torch.isfinite(w).all() and w.max() == 1.0 and w[0] < 1  # low-noise steps are down-weighted
    if zero_terminal_snr:
        assert w[-1] == 1.0  # the limit of min(SNR, γ)/SNR as SNR -> 0, not 0/0
    assert torch.equal(loss_weights(schedule, t, None), torch.ones(T))


def test_diffusion_loss_returns_non_finite_values_for_the_caller_to_handle():
    schedule = NoiseSchedule(schedule_config("linear"))
    nan_net = lambda x_t, t, context: torch.full_like(x_t, float("nan"))  # noqa: E731
    loss = diffusion_loss(nan_net, schedule, torch.zeros(2, 4, 4, 4), None)
    assert loss.ndim == 0 and not torch.isfinite(loss)


# ----------------------------------------------------------------------------- v-prediction


def test_velocity_matches_closed_form_and_diffusers():
    schedule = NoiseSchedule(schedule_config("scaled_linear"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    v = schedule.velocity(x0, t, eps)
    abar = schedule.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    torch.testing.assert_close(v, diffusers_ddpm("scaled_linear").get_velocity(x0, eps, t))
    # x0 and ε come back from (x_t, v): the rotation is orthogonal.
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(abar.sqrt() * x_t - (1 - abar).sqrt() * v, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_v_prediction_loss_targets_the_velocity(min_snr_gamma):
    cfg = ScheduleConfig(T, "scaled_linear", 0.00085, 0.012, prediction_type="v_prediction")
    schedule = NoiseSchedule(cfg)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    net = RecordingNet()
    loss = diffusion_loss(net, schedule, x0, None, min_snr_gamma=min_snr_gamma, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, T, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = schedule.alphas_cumprod[t].view(6, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    mse = ((0.5 * net.x_t - v) ** 2).mean(dim=(1, 2, 3))
    snr = schedule.snr(t)
    weights = torch.ones(6) if min_snr_gamma is None else torch.minimum(snr, torch.tensor(min_snr_gamma)) / (snr + 1)
    torch.testing.assert_close(loss, (mse * weights).mean())
    assert not torch.isclose(loss, expected_loss(NoiseSchedule(schedule_config("scaled_linear")), x0, 7, min_snr_gamma)[0])


def test_min_snr_weights_put_the_same_weight_on_x0_for_both_parametrizations():
    # ‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖² and ‖v̂ − v‖² = (SNR + 1)·‖x̂0 − x0‖², so each weight times its
    # factor must give min(SNR, γ) (Hang et al. 2023, sec. 3.4).
    t = torch.arange(T)
    for prediction_type, factor in (("epsilon", lambda s: s), ("v_prediction", lambda s: s + 1)):
        schedule = NoiseSchedule(ScheduleConfig(T, "linear", 1e-4, 0.02, prediction_type=prediction_type))
        snr = schedule.snr(t)
        torch.testing.assert_close(loss_weights(schedule, t, 5.0) * factor(snr), snr.clamp(max=5.0))
