"""Unit tests of the training pieces that otherwise only end-to-end runs cover: the EMA, the LR schedule,
the VAE loss terms, skipping a non-finite loss and bf16 autocast on CPU (augmentation: test_augment.py).
Tiny tensors and models, in this process."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from diffusion.errors import TrainError
from diffusion.io.weights import WeightsError
from diffusion.train.checkpoints import write_checkpoint
from diffusion.train.loop import Stage, check_finite, optimize
from diffusion.train.optim import EMA, adamw, lr_lambda
from diffusion.train.vae_stage import adaptive_weight, hinge_d_loss, vae_loss

CPU = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)


# ----------------------------------------------------------------------------- EMA


def ema_module() -> nn.Module:
    """A Linear and a BatchNorm: float parameters, float buffers and an int64 buffer (num_batches_tracked)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_decay_warms_up_then_stays_at_decay():
    ema = EMA(ema_module(), decay=0.99)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    # (1 + s)/(10 + s) reaches 0.99 at s = 890: the cap takes over there and holds.
    assert ema.decay_at(889) < 0.99 and ema.decay_at(890) == pytest.approx(0.99) and ema.decay_at(10**6) == 0.99
    assert EMA(ema_module(), decay=0.99, warmup=False).decay_at(0) == 0.99


def test_ema_update_matches_the_closed_form_and_copies_int_buffers():
    module = ema_module()
    w0 = module[0].weight.detach().clone().double()
    ema = EMA(module, decay=0.15)
    expected = w0
    for step, w in enumerate([1.0, -2.0, 3.0]):  # decays 0.1, then min(0.15, 2/11) = 0.15 twice
        with torch.no_grad():
            module[0].weight.fill_(w)
            module[1].num_batches_tracked.fill_(10 + step)
        ema.update(module, step)
        d = min(0.15, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * w
        assert torch.allclose(ema.shadow["0.weight"].double(), expected, atol=1e-6), step
        assert ema.shadow["1.num_batches_tracked"].item() == 10 + step  # copied, not averaged
    # Pin the hand computation's numbers: 0.1·w0 + 0.9·1, then 0.15·(...) + 0.85·(−2), then 0.15·(...) + 0.85·3.
    by_hand = 0.15 * (0.15 * (0.1 * w0 + 0.9) + 0.85 * -2.0) + 0.85 * 3.0
    assert torch.allclose(ema.shadow["0.weight"].double(), by_hand, atol=1e-6)


def test_ema_swapped_in_uses_the_shadow_and_restores_the_training_weights():
    module = ema_module()
    ema = EMA(module, decay=0.5, warmup=False)
    with torch.no_grad():
        module[0].weight.fill_(4.0)
        module[1].num_batches_tracked.fill_(3)
    ema.update(module, 0)
    with torch.no_grad():
        module[0].weight.fill_(8.0)  # the training weights move on
        module[1].num_batches_tracked.fill_(5)
    training = {k: v.clone() for k, v in module.state_dict().items()}

    with ema.swapped_in(module) as m:
        assert m is module
        assert torch.equal(module[0].weight, ema.shadow["0.weight"]) and not torch.equal(module[0].weight, training["0.weight"])
        assert module[1].num_batches_tracked.item() == 3
    for k, v in module.state_dict().items():
        assert torch.equal(v, training[k]), k
    assert module[1].num_batches_tracked.dtype == torch.int64

    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in(module):
        assert torch.equal(module[0].weight, ema.shadow["0.weight"])
        raise RuntimeError("inside")
    for k, v in module.state_dict().items():
        assert torch.equal(v, training[k]), k


def test_ema_load_state_dict_checks_the_keys():
    module = ema_module()
    ema = EMA(module, decay=0.9)
    state = {k: torch.full_like(v, 2.0) for k, v in ema.state_dict().items()}
    ema.load_state_dict(state)
    assert all(torch.equal(ema.shadow[k], state[k]) for k in state)
    missing = {k: v for k, v in state.items() if k != "0.bias"}
    with pytest.raises(WeightsError, match="0.bias"):
        ema.load_state_dict(missing)
    with pytest.raises(WeightsError, match="extra.weight"):
        ema.load_state_dict({**state, "extra.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- LR schedule


def test_lr_warms_up_linearly_then_holds_or_follows_a_cosine():
    constant = lr_lambda(4, 12, "constant")
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert constant(100) == 1.0
    assert lr_lambda(0, 12, "constant")(0) == 1.0  # no warmup: full LR from the first step

    cosine = lr_lambda(4, 12, "cosine")
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == pytest.approx(1.0)  # the cosine starts where the warmup ends
    assert cosine(8) == pytest.approx(0.5)  # midpoint of the 8 post-warmup steps
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(12) == pytest.approx(0.0, abs=1e-12) and cosine(20) == pytest.approx(0.0, abs=1e-12)  # clamped
    values = [cosine(s) for s in range(4, 13)]
    assert values == sorted(values, reverse=True)

    # Through LambdaLR, the first optimizer step already runs at the first warmup value.
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = LambdaLR(opt, cosine)
    assert sched.get_last_lr() == [0.5]
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [1.0]


# ----------------------------------------------------------------------------- VAE loss terms


class FakePosterior:
    def __init__(self, kl: torch.Tensor):
        self._kl = kl

    def kl(self) -> torch.Tensor:
        return self._kl


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_vae_loss_is_mean_reconstruction_plus_weighted_kl_per_pixel(kind):
    x = torch.zeros(2, 3, 2, 2)
    x_rec = torch.zeros(2, 3, 2, 2)
    x_rec[0, 0, 0, 0], x_rec[1, 2, 1, 1] = 2.0, -1.0  # errors 2 and −1 among 24 pixels
    rec_expected = (2.0 + 1.0) / 24 if kind == "l1" else (4.0 + 1.0) / 24
    posterior = FakePosterior(torch.tensor([12.0, 36.0]))  # mean 24, over 12 values per image: 2
    rec, total = vae_loss(x, x_rec, posterior, kind, kl_weight=0.5)
    assert rec.item() == pytest.approx(rec_expected)
    assert total.item() == pytest.approx(rec_expected + 0.5 * 2.0)
    _, no_kl = vae_loss(x, x_rec, posterior, kind, kl_weight=0.0)
    assert no_kl.item() == pytest.approx(rec_expected)


def test_hinge_d_loss_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 − D): 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + D): 0, 1, 2.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert hinge_d_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)).item() == 0.0  # confident and right: no loss


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x, target = torch.randn(5, 3), torch.randn(5, 2)
    y = layer(x)
    rec = (y - target).pow(2).mean()
    g_loss = -(y * torch.tensor([1.0, 3.0])).mean()
    W, N = layer.weight.detach(), y.numel()
    # d rec/dW = (2/N)(xWᵀ − t)ᵀ x;  d g/dW = −(1/N) cᵀ 1ᵀ x with c = (1, 3) per output row.
    rec_grad = (2 / N) * (x @ W.T - target).T @ x
    g_grad = -(1 / N) * torch.tensor([[1.0], [3.0]]) * x.sum(0, keepdim=True)
    weight = adaptive_weight(rec, g_loss, layer.weight)
    assert weight.item() == pytest.approx((rec_grad.norm() / (g_grad.norm() + 1e-4)).item(), rel=1e-5)
    assert not weight.requires_grad
    (rec + weight * g_loss).backward()  # the graph was kept for the real backward pass
    # An adversarial term with no gradient: the weight is capped at 1e4, not inf.
    assert adaptive_weight(layer(x).pow(2).mean() * 1e3, 0 * layer(x).sum(), layer.weight).item() == 1e4


# ----------------------------------------------------------------------------- non-finite losses


class TinyStage(Stage):
    name = "ldm"

    def __init__(self, tmp_path):
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2)
        self.params = list(self.model.parameters())
        self.grad_clip = 1.0
        self.optimizer = adamw(self.params, lr=0.1)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(4, 10))
        self.checkpoints = tmp_path / "checkpoints"
        self.updates: list[int] = []

    def after_update(self, step: int) -> None:
        self.updates.append(step)

    def backward(self, scale: float) -> float:
        loss = self.model(torch.ones(4, 3)).pow(2).mean() * scale
        loss.backward()
        return loss.item()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def tiny_run(on_nonfinite: str):
    said, clipped = [], []

    def clip_grad_norm_(params, max_norm):
        clipped.append((list(params), max_norm))
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    run = SimpleNamespace(
        cfg=SimpleNamespace(training=SimpleNamespace(on_nonfinite=on_nonfinite)),
        say=said.append,
        accelerator=SimpleNamespace(clip_grad_norm_=clip_grad_norm_),
    )
    return run, said, clipped


def test_a_finite_loss_clips_and_updates(tmp_path):
    stage, (run, said, clipped) = TinyStage(tmp_path), tiny_run("stop")
    before = stage.weights()
    loss = stage.backward(1.0)
    check_finite(run, stage, 1, loss)
    assert all(p.grad is not None for p in stage.params) and said == []
    optimize(run, stage, 0, math.isfinite(loss))
    assert all(not torch.equal(a, b) for a, b in zip(before, stage.weights()))
    assert [(len(ps), c) for ps, c in clipped] == [(2, 1.0)] and all(a is b for a, b in zip(clipped[0][0], stage.params))
    assert stage.updates == [0] and all(p.grad is None for p in stage.params)
    assert stage.scheduler.get_last_lr() == [pytest.approx(0.1 * 2 / 4)]


# The schedule advances although the optimizer never stepped, which PyTorch warns about: expected here.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_skip_drops_the_update_but_advances_the_schedule(tmp_path):
    stage, (run, said, clipped) = TinyStage(tmp_path), tiny_run("skip")
    before = stage.weights()
    loss = stage.backward(float("nan"))
    assert all(p.grad.isnan().all() for p in stage.params)
    check_finite(run, stage, 3, loss)
    assert all(p.grad is None for p in stage.params)
    [message] = said
    assert "non-finite loss (nan)" in message and "ldm step 3" in message and "skipped" in message
    optimize(run, stage, 2, math.isfinite(loss))
    assert all(torch.equal(a, b) for a, b in zip(before, stage.weights()))
    assert clipped == [] and stage.updates == [] and not stage.optimizer.state  # Adam's step count untouched
    assert stage.scheduler.last_epoch == 1 and stage.scheduler.get_last_lr() == [pytest.approx(0.1 * 2 / 4)]

    # optimize alone must not apply NaN gradients either (they would turn every weight into NaN).
    stage.backward(float("nan"))
    optimize(run, stage, 3, False)
    assert all(torch.equal(a, b) for a, b in zip(before, stage.weights()))
    assert all(p.grad is None for p in stage.params) and stage.scheduler.last_epoch == 2


def test_stop_raises_and_names_the_step_and_the_last_checkpoint(tmp_path):
    stage, (run, said, _) = TinyStage(tmp_path), tiny_run("stop")
    loss = stage.backward(float("inf"))
    with pytest.raises(TrainError, match=r"non-finite loss \(inf\) at ldm step 5; stopped without saving, no checkpoint was saved yet"):
        check_finite(run, stage, 5, loss)
    assert all(p.grad is None for p in stage.params) and said == []

    for step in (2, 4):
        with write_checkpoint(stage.checkpoints, step, keep=2) as tmp:
            (tmp / "state.pt").write_bytes(b"x")
    with pytest.raises(TrainError, match="step 6.*the last good checkpoint is .*step-000004") as error:
        check_finite(run, stage, 6, float("nan"))
    assert "step-000002" not in str(error.value)


# ----------------------------------------------------------------------------- bf16 on CPU


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton that refuses another mixed_precision: start and end clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_bf16_training_step_on_cpu(tiny_pipeline, fresh_accelerate_state):
    from accelerate import Accelerator

    from diffusion.schedule import diffusion_loss
    from diffusion.train.ldm_stage import Denoiser

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    model = Denoiser(copy.deepcopy(tiny_pipeline.unet).float()).train()  # a copy: prepare() rewrites forward
    model_p, opt = acc.prepare(model, adamw(model.parameters(), lr=1e-3))
    seen = []
    for kind in (nn.Conv2d, nn.Linear):
        layer = next(m for m in model.modules() if isinstance(m, kind))
        layer.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, out.dtype)))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    g = torch.Generator().manual_seed(0)
    z0, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    with acc.autocast():
        loss = diffusion_loss(model_p, tiny_pipeline.schedule, z0, cond, generator=g)
    acc.backward(loss)
    opt.step()

    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert sorted(seen) == [("Conv2d", torch.bfloat16), ("Linear", torch.bfloat16)]
    after = model.state_dict()
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in after.values())  # fp32 master weights
    assert any(not torch.equal(before[k], after[k]) for k in before)
