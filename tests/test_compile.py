"""Compiled and mixed-precision modes: the `auto` choices, torch.compile in training (resume and gradient
checkpointing), bf16 autocast on CPU, and sample.py --compile with --from-png.

The tests that compile are marked `compile` and left out of the default run (pyproject.toml): on a
2-core CPU inductor spends two to four minutes building the kernels of even the tiny models. Run them
with `pytest -m compile`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import devices
from diffusion.config import ConfigError, load_config
from diffusion.train.checkpoints import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_train import ENV, assert_same_weights, metrics, ok, train  # noqa: E402

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- auto choices


@pytest.mark.parametrize("flags, want", [(("amx_bf16", "avx512_bf16"), "bf16"), (("avx512_bf16",), "bf16"), ((), "no")])
def test_auto_precision_follows_the_cpus_bf16_instructions(monkeypatch, flags, want):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: flags)
    choice = devices.resolve_mixed_precision("auto", CPU)
    assert choice.value == want
    assert (flags[0] in choice.reason) if flags else "emulated" in choice.reason
    assert devices.resolve_mixed_precision("fp16", CPU).value == "fp16"  # a set value is kept


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    real = Path

    monkeypatch.setattr(devices, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    devices.cpu_bf16_flags.cache_clear()
    try:
        assert devices.cpu_bf16_flags() == ("amx_bf16", "avx512_bf16")
        info.write_text("flags\t\t: fpu sse2 avx2\n")
        devices.cpu_bf16_flags.cache_clear()
        assert devices.cpu_bf16_flags() == ()
    finally:
        devices.cpu_bf16_flags.cache_clear()


def test_auto_compile_is_on_for_gpus_only():
    assert devices.resolve_compile("auto", CPU).value == "no"
    assert devices.resolve_compile("auto", torch.device("cuda")).value == "yes"
    assert devices.resolve_compile("yes", CPU).value == "yes"


def test_auto_channels_last_trains_nchw_only_in_fp32_on_a_cpu():
    assert devices.resolve_channels_last("auto", CPU, "no").value == "no"
    assert devices.resolve_channels_last("auto", CPU, "bf16").value == "yes"
    assert devices.resolve_channels_last("auto", torch.device("cuda"), "no").value == "yes"
    assert devices.resolve_channels_last("yes", CPU, "no").value == "yes"


@pytest.mark.parametrize("channels_last", [True, False])
def test_training_layout_changes_strides_not_results(channels_last):
    """Run.layout puts the trained modules in the run's layout; a training step's loss and gradients
    are the same in both, up to the order of floating-point sums."""
    from diffusion.config import UNetConfig
    from diffusion.models.unet import UNet
    from diffusion.train.loop import Run

    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=8, norm_groups=4)
    torch.manual_seed(0)
    ref, net = UNet(cfg), UNet(cfg)
    with torch.no_grad():  # no zero-initialised output layers, so that every weight gets a gradient
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.load_state_dict(ref.state_dict())
    Run(*[None] * 7, channels_last=channels_last).layout(net)
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert net.conv_in.weight.is_contiguous() != channels_last

    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 8)
    losses = []
    for model in (ref, net):
        loss = model(x, t, ctx).square().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(ref.named_parameters(), net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_config_takes_yaml_booleans_and_rejects_other_values():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["training.compile=true", "training.mixed_precision=auto"])
    assert cfg.training.compile == "yes" and cfg.training.mixed_precision == "auto"
    assert load_config(ROOT / "configs" / "tiny.yaml", ["training.compile=false"]).training.compile == "no"
    with pytest.raises(ConfigError, match="training.compile"):
        load_config(ROOT / "configs" / "tiny.yaml", ["training.compile=fast"])


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny VAE (and the shapes data it generated), shared by the LDM-stage runs below."""
    root = tmp_path_factory.mktemp("compile")
    ok(train(root / "data", root / "vae-run", "--stage", "vae"))
    return root / "data", root / "vae-run" / "vae"


COMPILED = ["training.compile=yes", "unet.gradient_checkpointing=true"]


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_training_with_checkpointing_resumes_bit_exactly(vae_dir, tmp_path):
    data, vae = vae_dir
    ref = ok(train(data, tmp_path / "ref", f"vae_training.pretrained={vae}", *COMPILED, timeout=900))
    assert "compiled kernels round differently" in ref.stderr
    out = tmp_path / "resumed"
    ok(train(data, out, f"vae_training.pretrained={vae}", *COMPILED, env={"DIFFUSION_STOP_AT": "ldm:3"}, timeout=900))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 3]
    ok(train(data, out, f"vae_training.pretrained={vae}", *COMPILED, "--resume", timeout=900))
    for name in ("unet.safetensors", "text_encoder.safetensors"):
        assert_same_weights(tmp_path / "ref" / "model" / name, out / "model" / name)


@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu(vae_dir, tmp_path):
    data, vae = vae_dir
    short = [f"vae_training.pretrained={vae}", "training.max_steps=3", "training.grad_accum=1", "sampling.steps=1"]
    proc = ok(train(data, tmp_path / "bf16", *short, "training.mixed_precision=bf16"))
    assert "saved the model" in proc.stderr
    ok(train(data, tmp_path / "fp32", *short))
    # Autocast ran: after the first step (the U-Net's zero-initialised output layer makes it the same)
    # the bf16 run's losses are close to fp32's but not equal to them.
    bf16, fp32 = ([m["loss"] for m in metrics(tmp_path / run) if m["stage"] == "ldm" and "loss" in m] for run in ("bf16", "fp32"))
    assert len(bf16) == len(fp32) == 3 and bf16[0] == fp32[0]
    assert all(a != b and a == pytest.approx(b, rel=0.05) for a, b in zip(bf16[1:], fp32[1:]))


@pytest.mark.slow
def test_auto_choices_are_reported_at_start(vae_dir, tmp_path):
    data, vae = vae_dir
    proc = ok(train(data, tmp_path / "auto", f"vae_training.pretrained={vae}", "training.max_steps=1",
                    "training.mixed_precision=auto", "training.compile=auto"))
    want = devices.resolve_mixed_precision("auto", CPU).value
    assert f"training.mixed_precision auto: {want} (" in proc.stderr
    assert "training.compile auto: no (on a CPU" in proc.stderr


# ----------------------------------------------------------------------------- generation


@pytest.mark.compile
def test_compiled_pipeline_matches_eager_and_sees_new_weights(tiny_config):
    from diffusion.pipeline import Pipeline

    torch.manual_seed(0)
    pipe = Pipeline(tiny_config.pipeline_config())
    prompts = ["a red circle in the top left", "a blue square in the center"]
    eager = [np.asarray(im, dtype=int) for im in pipe.generate(prompts, steps=3, batch_size=2)]
    pipe.compile(batch_size=2)
    compiled = [np.asarray(im, dtype=int) for im in pipe.generate(prompts, steps=3, batch_size=2)]
    assert max(np.abs(a - b).max() for a, b in zip(eager, compiled)) <= 2
    assert sorted(pipe.unet.state_dict()) == sorted(Pipeline(tiny_config.pipeline_config()).unet.state_dict())  # keys as saved
    with torch.no_grad():  # weights changed in place (as LoRA merging does) reach the compiled graph
        pipe.unet.conv_out.bias.add_(0.5)
    changed = [np.asarray(im, dtype=int) for im in pipe.generate(prompts, steps=3, batch_size=2)]
    assert max(np.abs(a - b).max() for a, b in zip(changed, compiled)) > 10
    # A convolution's weight too, which the compiled graph's convolutions keep reordered (cpu_conv): the
    # compiled images follow an eager pipeline given the same weights.
    eager_pipe = Pipeline(tiny_config.pipeline_config())
    for name in ("vae", "text_encoder", "unet"):
        getattr(eager_pipe, name).load_state_dict(getattr(pipe, name).state_dict())
    for unet in (pipe.unet, eager_pipe.unet):
        with torch.no_grad():
            unet.conv_out.weight.fill_(0.01)  # zero at first, like every tiny model's output layer
    want = [np.asarray(im, dtype=int) for im in eager_pipe.generate(prompts, steps=3, batch_size=2)]
    got = [np.asarray(im, dtype=int) for im in pipe.generate(prompts, steps=3, batch_size=2)]
    assert max(np.abs(a - b).max() for a, b in zip(got, want)) <= 2
    assert max(np.abs(a - b).max() for a, b in zip(got, changed)) > 10


@pytest.mark.slow
@pytest.mark.compile
def test_sample_compile_regenerates_its_images_exactly(tiny_model_dir, tmp_path):
    def sample(*flags) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_model_dir), "--out", str(tmp_path), "--compile", *flags]
        return ok(subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600))

    made = sample("--prompt", "a red circle in the top left", "--num-images", "3", "--batch-size", "3", "--steps", "4", "--seed", "7")
    assert "--compile: the U-Net is compiled and warmed up for 3 image(s) per batch" in made.stderr
    second = Path(made.stdout.split()[1])
    again = Path(sample("--from-png", str(second)).stdout.split()[0])
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(again)))


def test_app_compiles_and_warms_up_before_it_serves(tiny_pipeline, monkeypatch, capsys):
    import app

    events = []
    monkeypatch.setattr(app, "load_model", lambda *a, **k: tiny_pipeline)
    monkeypatch.setattr(type(tiny_pipeline), "compile", lambda self, n, **request: events.append(("compile", n)))
    monkeypatch.setattr(app, "build_demo", lambda *a: type("Demo", (), {"launch": lambda self, **kw: events.append(("launch",))})())
    assert app.main(["--model", "whatever", "--compile"]) == 0
    assert events == [("compile", app.DEFAULT_IMAGES), ("launch",)]
    assert "--compile: the U-Net is compiled and warmed up for 4 image(s) per batch" in capsys.readouterr().err


def test_a_missing_cpp_compiler_is_one_line_before_any_work(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from torch._inductor import cpp_builder, exc

    import sample
    from diffusion.train.run import train as train_in_process

    def no_compiler():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert "no C++ compiler was found" in devices.compiler_missing(CPU)
    assert devices.compiler_missing(torch.device("cuda")) is None

    code = sample.main(["--model", str(tiny_model_dir), "--prompt", "a red circle", "--out", str(tmp_path / "png"), "--compile"])
    assert code == 1 and not (tmp_path / "png").exists()  # refused before any image was made
    err = capsys.readouterr().err
    assert err.startswith("error: --compile: torch.compile on a CPU builds C++ kernels") and err.count("\n") == 1, err

    from diffusion.errors import TrainError

    with pytest.raises(TrainError, match=r"^training.compile: torch.compile on a CPU .* install g\+\+ .*training.compile=no$"):
        train_in_process(str(ROOT / "configs" / "tiny.yaml"), [f"output_dir={tmp_path / 'run'}", "training.compile=yes"])
    assert not (tmp_path / "run").exists()  # nothing written
