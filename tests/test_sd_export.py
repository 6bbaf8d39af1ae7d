"""Exporting models with `python -m diffusion.convert`: our quick-start architectures as diffusers folders that
diffusers' own StableDiffusionPipeline draws sample.py's pixels from; round trips through diffusers folders and
single files that give back the same bits; and destinations that are refused, never overwritten."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # builds and runs whole pipelines; the layouts have fast tests of their own

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from diffusion import convert  # noqa: E402
from diffusion.config import load_config  # noqa: E402
from diffusion.io import sd_text  # noqa: E402
from diffusion.models.layers import Attention  # noqa: E402
from diffusion.pipeline import Pipeline, load_pipeline  # noqa: E402
from sd_builders import FLAVOURS, make_sd_model, randomise  # noqa: E402

PROMPT, SEED, STEPS = "a red circle in the top left", 3, 10
COMPONENTS = ("unet", "vae", "text_encoder")
DIFFUSERS_WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder": "text_encoder/model.safetensors"}


def random_pipeline(config: str, *overrides: str) -> Pipeline:
    """configs/<config>.yaml's architecture, schedule and sampling defaults (with `key=value` overrides), with
    every weight random and none zero."""
    pipe = Pipeline(load_config(ROOT / "configs" / f"{config}.yaml", overrides).pipeline_config())
    for module, seed, scale in ((pipe.unet, 3, 0.5), (pipe.vae, 1, 1.0), (pipe.text_encoder, 2, 1.0)):
        randomise(module, seed, scale)
    sharpen_attention(pipe.unet)
    return pipe


def sharpen_attention(unet: torch.nn.Module, factor: float = 4.0) -> None:
    """Scale the U-Net's queries and keys so that attention is peaked rather than near uniform: a uniform
    average is the same whatever the heads, and a wrong head count would not show in the pixels."""
    with torch.no_grad():
        for attn in (m for m in unet.modules() if isinstance(m, Attention)):
            if attn.is_cross:
                attn.to_q.weight.mul_(factor)
                attn.to_kv.weight[: attn.to_kv.out_features // 2].mul_(factor)
            else:
                attn.to_qkv.weight[: 2 * attn.to_qkv.out_features // 3].mul_(factor)


@pytest.fixture(scope="module", params=[("shapes",), ("tiny", "unet.attention_levels=[0,1]")], ids=["shapes", "tiny"])
def native_model(request, tmp_path_factory) -> tuple[Pipeline, Path]:
    """(the pipeline as loaded back, our model folder). shapes: f=4 VAE of 3 levels (16, 16, 32 channels),
    attention at the second U-Net level only, linear betas, trailing spacing, DDIM to ᾱ = 1; tiny: f=2 VAE,
    attention at both U-Net levels, leading spacing, DDIM to ᾱ_0. Both: GroupNorms of 8 groups and a
    16-token text context."""
    folder = tmp_path_factory.mktemp(request.param[0]) / "model"
    random_pipeline(*request.param).save(folder)
    return load_pipeline(folder, device="cpu"), folder


def run(*argv) -> int:
    return convert.main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def drawn_by_sample(model: Path, out: Path, guidance: float, size: int) -> np.ndarray:
    [path] = sample.generate_files(["--model", str(model), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
                                    "--guidance", str(guidance), "--height", str(size), "--width", str(size),
                                    "--sampler", "ddim", "--out", str(out), "--device", "cpu"])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def drawn(pipe: Pipeline, guidance: float) -> np.ndarray:
    return np.asarray(pipe.generate(PROMPT, steps=STEPS, seed=SEED, guidance=guidance)[0])


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    assert ours.keys() == theirs.keys(), (what, sorted(set(ours) ^ set(theirs))[:5])
    different = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not different, (what, different[:5])


def folder_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors in a diffusers folder. transformers 5 saves CLIPTextModel without the
    `text_model.` prefix that ours keep (4.x and 5.x read both), so the prefix is left out of the comparison."""
    tensors = {c: load_file(str(root / file)) for c, file in DIFFUSERS_WEIGHTS.items()}
    tensors["text_encoder"] = {k.removeprefix("text_model."): v for k, v in tensors["text_encoder"].items()}
    return tensors


# ----------------------------------------------------------------------------- our models in diffusers


def test_diffusers_draws_the_pixels_sample_draws(native_model, tmp_path):
    pipe, folder = native_model
    cfg, size = pipe.cfg, pipe.cfg.info.resolution
    assert run(folder, tmp_path / "sd", "--to", "diffusers") == 0
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert (sd.tokenizer.model_max_length, sd.tokenizer.pad_token_id) == (cfg.text_encoder.context_length, pipe.text_encoder.pad_id)
    scheduler = sd.scheduler.config
    assert (scheduler.timestep_spacing, scheduler.set_alpha_to_one, scheduler.steps_offset) == (
        cfg.sampling.timestep_spacing, cfg.sampling.final_alpha_one, cfg.sampling.steps_offset)
    image = sd(PROMPT, num_inference_steps=STEPS, guidance_scale=cfg.sampling.guidance, height=size, width=size,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    theirs = (image * 255).round().astype(np.uint8)
    mine = drawn_by_sample(folder, tmp_path / "png", cfg.sampling.guidance, size)
    diff = np.abs(mine.astype(int) - theirs.astype(int))
    assert theirs.std() > 10  # a real image, not a flat one that anything would match
    assert diff.max() <= 2, (cfg.info.name, diff.max(), (diff > 2).mean())


@pytest.mark.parametrize("to, name", [("diffusers", "sd"), ("single-file", "model.safetensors")])
def test_a_round_trip_gives_back_the_bits_and_the_pixels(native_model, to, name, tmp_path):
    pipe, folder = native_model
    assert run(folder, tmp_path / name, "--to", to) == 0
    assert run(tmp_path / name, tmp_path / "back", "--to", "native") == 0
    back = load_pipeline(tmp_path / "back", device="cpu")
    for component in COMPONENTS:
        assert_same_tensors(getattr(back, component).state_dict(), getattr(pipe, component).state_dict(), component)
    assert (back.cfg.unet, back.cfg.vae, back.cfg.schedule) == (pipe.cfg.unet, pipe.cfg.vae, pipe.cfg.schedule)
    if to == "single-file":  # our whole config travels in the metadata; the bundled vocabulary's pad id is written out
        assert back.cfg == dataclasses.replace(pipe.cfg, text_encoder=dataclasses.replace(pipe.cfg.text_encoder, pad_id=0))
    else:  # a diffusers folder has no place for the sampling defaults (steps, guidance, eta)
        stepping = ("sampler", "timestep_spacing", "steps_offset", "final_alpha_one")
        assert all(getattr(back.cfg.sampling, f) == getattr(pipe.cfg.sampling, f) for f in stepping)
    guidance = pipe.cfg.sampling.guidance
    assert np.array_equal(drawn(back, guidance), drawn(pipe, guidance))


@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero terminal SNR"])
def test_ddpm_on_a_cosine_v_prediction_schedule_exports_as_diffusers_reads_it(zero_snr, tmp_path):
    """The scheduler's names and flags (DDPMScheduler, squaredcos_cap_v2, rescale_betas_zero_snr) read back as
    ours and give diffusers our betas, and its DDPMScheduler draws our pixels, also where ᾱ = 0 at the first
    step (a v model's x0 is then −v)."""
    pipe = random_pipeline("tiny")
    schedule = dataclasses.replace(pipe.cfg.schedule, beta_schedule="cosine", prediction_type="v_prediction",
                                   zero_terminal_snr=zero_snr)
    sampling = dataclasses.replace(pipe.cfg.sampling, sampler="ddpm", timestep_spacing="trailing")
    cfg = dataclasses.replace(pipe.cfg, schedule=schedule, sampling=sampling)
    pipe = Pipeline(cfg, pipe.vae, pipe.text_encoder, pipe.unet)
    pipe.save(tmp_path / "model")
    assert run(tmp_path / "model", tmp_path / "sd", "--to", "diffusers") == 0
    back = load_pipeline(tmp_path / "sd", device="cpu")
    assert (back.cfg.schedule, back.cfg.sampling.sampler) == (cfg.schedule, "ddpm")
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(sd.scheduler).__name__ == "DDPMScheduler" and torch.equal(sd.scheduler.betas, pipe.schedule.betas)
    size = cfg.info.resolution
    image = sd(PROMPT, num_inference_steps=STEPS, guidance_scale=cfg.sampling.guidance, height=size, width=size,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    diff = np.abs(drawn(pipe, cfg.sampling.guidance).astype(int) - (image * 255).round().astype(int))
    assert diff.max() <= 2, diff.max()


def test_a_unet_middle_without_attention_goes_to_a_single_file_not_to_diffusers(tmp_path, capsys):
    pipe = random_pipeline("tiny", "unet.mid_attention=false")
    pipe.save(tmp_path / "model")
    assert run(tmp_path / "model", tmp_path / "sd", "--to", "diffusers") == 1
    assert "UNetMidBlock2D" in one_error_line(capsys) and not (tmp_path / "sd").exists()
    assert run(tmp_path / "model", tmp_path / "model.safetensors", "--to", "single-file") == 0
    back = load_pipeline(tmp_path / "model.safetensors", device="cpu")
    assert back.cfg.unet == pipe.cfg.unet
    assert_same_tensors(back.unet.state_dict(), pipe.unet.state_dict(), "unet")


# ----------------------------------------------------------------------------- SD's own layouts


@pytest.fixture(scope="module", params=list(FLAVOURS))
def sd_files(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(flavour, diffusers folder, single file) of tests/sd_builders.py's tiny SD 1.x and SD 2.x pipelines."""
    root = tmp_path_factory.mktemp(request.param)
    make_sd_model(request.param, root)
    return request.param, root / "folder", root / "model.safetensors"


def assert_same_configs(ours: Path, theirs: Path) -> None:
    """Every field we write holds what diffusers wrote for the same model."""
    for file in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        mine, original = (json.loads((root / file).read_text()) for root in (ours, theirs))
        assert {k: v for k, v in mine.items() if k != "_diffusers_version" and original.get(k, v) != v} == {}, file


def test_an_sd_folder_through_a_single_file_and_back_keeps_every_tensor(sd_files, tmp_path):
    _, folder, _ = sd_files
    assert run(folder, tmp_path / "model.safetensors", "--to", "single-file") == 0
    assert run(tmp_path / "model.safetensors", tmp_path / "folder", "--to", "diffusers") == 0
    ours, theirs = folder_tensors(tmp_path / "folder"), folder_tensors(folder)
    for component in COMPONENTS:
        assert_same_tensors(ours[component], theirs[component], component)
    assert_same_configs(tmp_path / "folder", folder)


def test_an_sd_single_file_keeps_every_tensor_in_both_formats(sd_files, tmp_path):
    """SD 2.x's file holds the tower's last block and projection, which conditioning skips: kept all the same."""
    flavour, folder, single = sd_files
    assert run(single, tmp_path / "again.safetensors", "--to", "single-file") == 0
    original = load_file(str(single))
    assert_same_tensors(load_file(str(tmp_path / "again.safetensors")), original, "single file")
    if flavour == "sd2":
        assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.transformer.resblocks.2.ln_1.weight"} <= set(original)
    assert run(single, tmp_path / "folder", "--to", "diffusers") == 0
    ours, theirs = folder_tensors(tmp_path / "folder"), folder_tensors(folder)
    for component in COMPONENTS:
        assert_same_tensors(ours[component], theirs[component], component)


# ----------------------------------------------------------------------------- refusals


def test_an_existing_destination_is_refused_and_left_as_it_was(native_model, tmp_path, capsys):
    _, folder = native_model
    taken_folder, taken_file = tmp_path / "taken", tmp_path / "taken.safetensors"
    taken_folder.mkdir()
    (taken_folder / "notes.txt").write_text("mine")
    taken_file.write_bytes(b"mine")
    for dst, to in ((taken_folder, "diffusers"), (taken_folder, "native"), (taken_file, "single-file")):
        assert run(folder, dst, "--to", to) == 1
        assert "already exists" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "taken.safetensors"]
    assert [p.name for p in taken_folder.iterdir()] == ["notes.txt"] and (taken_folder / "notes.txt").read_text() == "mine"
    assert taken_file.read_bytes() == b"mine"


@pytest.mark.parametrize("dst, args", [
    ("out", ["--to", "onnx"]), ("out", []), ("model.ckpt", ["--to", "single-file"]),
    ("out", ["--to", "native", "--ema", "on"]), ("out", ["--to", "native", "--prediction-type", "v_prediction"]),
], ids=["bad --to", "no --to", "not .safetensors", "--ema for a folder", "a contradicting prediction type"])
def test_a_bad_command_line_exits_2_and_writes_nothing(native_model, dst, args, tmp_path, capsys):
    _, folder = native_model
    assert run(folder, tmp_path / dst, *args) == 2
    one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_a_single_file_refuses_a_vocabulary_it_cannot_name(tmp_path, capsys):
    """A single file carries no tokenizer: readers take CLIP's, so a model on another vocabulary stays a folder."""
    files = sd_text.tokenizer_files(random_pipeline("tiny").text_encoder)
    vocab = dict(files.vocab)
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    sd_text.write_tokenizer(dataclasses.replace(files, vocab=vocab), tmp_path / "vocab", 16)
    random_pipeline("tiny", f"text_encoder.tokenizer={tmp_path / 'vocab'}").save(tmp_path / "model")
    assert run(tmp_path / "model", tmp_path / "model.safetensors", "--to", "single-file") == 1
    assert "not CLIP's" in one_error_line(capsys) and not (tmp_path / "model.safetensors").exists()
