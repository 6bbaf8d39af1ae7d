"""The pipeline: save/load round trips, seeds, named weight errors, and that a tiny U-Net learns."""

import shutil

import numpy as np
import pytest
import torch

from diffusion.config import ScheduleConfig, TextEncoderConfig, UNetConfig
from diffusion.infotext import JSON_KEY, GenerationParams
from diffusion.pipeline import Pipeline, PipelineError, load_pipeline
from diffusion.schedule import NoiseSchedule, diffusion_loss
from diffusion.models.text import TextEncoder
from diffusion.models.unet import UNet


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_generate_returns_images_with_parameters(tiny_pipeline):
    images = tiny_pipeline.generate(["a red circle in the center", "a blue square in the top left"], steps=3, seed=7)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    assert "Seed: 8" in images[1].info["parameters"]
    assert images[1].info["parameters"].startswith("a blue square in the top left\n")


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_generation_projects_the_text_once_per_batch(tiny_pipeline, guidance, monkeypatch):
    """The cross-attention keys and values of the text are the same at every step: projected once
    per batch, and the images are those of projecting them at every step."""
    import diffusion.pipeline

    unet, calls = tiny_pipeline.unet, []
    original = unet.prepare_context
    monkeypatch.setattr(unet, "prepare_context", lambda context: calls.append(1) or original(context))
    prompts = ["a red circle", "a blue square", "a cyan circle"]
    made = tiny_pipeline.generate(prompts, steps=4, batch_size=2, guidance=guidance)
    assert len(calls) == 2  # two batches, whatever the number of steps

    # Without `prepare`, the U-Net is handed the bare context and projects it itself at every step.
    cfg_with = diffusion.pipeline.classifier_free_guidance
    monkeypatch.setattr(diffusion.pipeline, "classifier_free_guidance", lambda *a, prepare=None: cfg_with(*a))
    calls.clear()
    plain = tiny_pipeline.generate(prompts, steps=4, batch_size=2, guidance=guidance)
    assert len(calls) >= 2 * 4
    assert np.array_equal(pixels(made), pixels(plain))


def test_save_load_regenerates_identical_images(tiny_pipeline, tiny_model_dir):
    kwargs = dict(prompts=["a red circle in the center"] * 2, negative_prompt="blurry", steps=4, guidance=2.0, seed=3)
    before = pixels(tiny_pipeline.generate(**kwargs))
    loaded = Pipeline.load(tiny_model_dir, device="cpu")
    assert pixels(loaded.generate(**kwargs)).tobytes() == before.tobytes()
    assert len(loaded.model_hash) == 10
    assert loaded.cfg == tiny_pipeline.cfg


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_seed_does_not_depend_on_batch_size(tiny_pipeline, sampler, eta):
    prompts = ["a red circle in the center", "a white square in the top right", "a blue triangle in the bottom left"]
    kwargs = dict(steps=3, sampler=sampler, eta=eta, seed=11)
    together = pixels(tiny_pipeline.generate(prompts, batch_size=3, **kwargs))
    one_by_one = pixels(tiny_pipeline.generate(prompts, batch_size=1, **kwargs))
    np.testing.assert_allclose(together.astype(int), one_by_one.astype(int), atol=1)
    # Image i depends only on seed + i: the third image alone, with seed 13, is the same picture.
    alone = pixels(tiny_pipeline.generate(prompts[2:], steps=3, sampler=sampler, eta=eta, seed=13))
    np.testing.assert_allclose(alone[0].astype(int), together[2].astype(int), atol=1)


def test_regenerate_gives_the_same_pixels(tiny_pipeline):
    prompts = ["a red circle in the center", "a white square in the top right", "a blue triangle in the bottom left"]
    images = tiny_pipeline.generate(prompts * 2, steps=3, seed=20, negative_prompt="green", batch_size=4)
    for image in images:  # batches of 4 and 2: every position, and a partial last batch
        params = GenerationParams.from_json(image.info[JSON_KEY])
        again = tiny_pipeline.regenerate(params)
        assert np.array_equal(np.asarray(again), np.asarray(image)) and again.info == image.info


def test_negative_prompt_and_guidance_change_the_image(tiny_pipeline):
    base = pixels(tiny_pipeline.generate("a red circle in the center", steps=3, guidance=3.0))
    assert not np.array_equal(base, pixels(tiny_pipeline.generate("a red circle in the center", steps=3, guidance=3.0, negative_prompt="red")))
    assert not np.array_equal(base, pixels(tiny_pipeline.generate("a red circle in the center", steps=3, guidance=1.0)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be between"),
        (dict(guidance=-1.0), "guidance must be >= 0"),
        (dict(eta=1.5), r"eta must be in \[0, 1\]"),
        (dict(height=17), "multiples of the VAE factor 2"),
        (dict(width=0), "multiples of the VAE factor 2"),
        (dict(sampler="heun"), "unknown sampler .heun.; choose one of"),
    ],
)
def test_generate_rejects_bad_arguments(tiny_pipeline, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        tiny_pipeline.generate("x", **kwargs)


def test_non_square_and_unconditional(tiny_pipeline):
    image = tiny_pipeline.generate("", steps=2, height=8, width=24)[0]
    assert image.size == (24, 8)


def test_load_errors_name_the_problem(tiny_model_dir, tmp_path):
    with pytest.raises(PipelineError, match="model folder not found"):
        load_pipeline(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="not a model folder"):
        load_pipeline(tmp_path / "empty")

    # A truncated weights file.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    data = (broken / "unet.safetensors").read_bytes()
    (broken / "unet.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="unet.safetensors.*truncated or corrupt"):
        load_pipeline(broken)

    # Weights saved from a differently sized model: the error lists the mis-shaped tensors.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    cfg_text = (mismatched / "pipeline.yaml").read_text().replace("model_channels: 32", "model_channels: 16")
    (mismatched / "pipeline.yaml").write_text(cfg_text)
    with pytest.raises(PipelineError, match=r"mis-shaped tensors: .*conv_in\.weight"):
        load_pipeline(mismatched)

    # Weights with a tensor missing and one unexpected.
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model_dir, renamed)
    state = load_file(renamed / "vae.safetensors")
    state["extra.weight"] = state.pop("quant_conv.weight")
    save_file(state, renamed / "vae.safetensors")
    with pytest.raises(PipelineError, match=r"missing tensors: quant_conv\.weight; unexpected tensors: extra\.weight"):
        load_pipeline(renamed)


def test_save_never_pickles(tiny_model_dir):
    import json
    import struct

    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [
        "pipeline.yaml", "text_encoder.safetensors", "unet.safetensors", "vae.safetensors"
    ]
    for path in tiny_model_dir.glob("*.safetensors"):
        raw = path.read_bytes()
        assert not raw.startswith((b"\x80", b"PK")), path  # neither a pickle nor torch.save's zip
        (n,) = struct.unpack("<Q", raw[:8])  # safetensors: an 8-byte header length, a JSON header, raw data
        header = json.loads(raw[8 : 8 + n])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert 8 + n + end == len(raw), path  # nothing else is stored after the tensors


@pytest.mark.slow
def test_tiny_unet_overfits_one_pair():
    """A tiny U-Net memorises one (latent, caption) pair: the loss falls at least 10x."""
    torch.manual_seed(0)
    text = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=2, context_length=8))
    net = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          num_heads=2, context_dim=32, norm_groups=8))
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    x0 = torch.randn(1, 4, 8, 8).repeat(8, 1, 1, 1)
    context = text.encode(["a red circle in the center"]).expand(8, -1, -1)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def mean_loss(n=8):
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return sum(diffusion_loss(net, schedule, x0, context, generator=g).item() for _ in range(n)) / n

    start = mean_loss()
    for _ in range(300):
        loss = diffusion_loss(net, schedule, x0, context, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = mean_loss()
    assert end < start / 10, (start, end)
