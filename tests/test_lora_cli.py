"""LoRA adapters on the command lines: sample.py --lora / prompt tags / --from-png, app.py's picker,
convert --merge-lora and eval --lora, on the tiny saved pipeline with random adapters."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app
import sample
from diffusion.infotext import read_png_params
from diffusion.lora.files import short_hash, write_kohya
from diffusion.lora.network import LoRALayer
from diffusion.lora.targets import pipeline_targets, select
from diffusion.pipeline import Pipeline, load_pipeline

PROMPT = "a red circle in the top left"


def make_lora(pipe, path: Path, groups=("attn",), seed=0, rank=4, std=0.2) -> Path:
    """A kohya file with random non-zero A and B for pipe's layers in `groups`."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for t in select(pipeline_targets(pipe), groups):
        kernel = [1, 1] if len(t.shape) == 4 else []
        layers[t] = LoRALayer(torch.randn(rank, *t.shape[1:], generator=g) * std,
                              torch.randn(t.shape[0], rank, *kernel, generator=g) * std, alpha=float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_kohya(layers, path, {"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def loras(tiny_pipeline, tmp_path_factory) -> Path:
    """A folder with cyan.safetensors (U-Net attention) and ink.safetensors (text encoder too)."""
    folder = tmp_path_factory.mktemp("loras")
    make_lora(tiny_pipeline, folder / "cyan.safetensors")
    make_lora(tiny_pipeline, folder / "ink.safetensors", groups=("attn", "text_attn"), seed=1)
    return folder


def run(model, out, *flags) -> list[Path]:
    return sample.generate_files(["--model", str(model), "--out", str(out), "--steps", "2", "--device", "cpu", *map(str, flags)])


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def error_of(main, argv, code: int = 1) -> str:
    """The one line a refused invocation prints on stderr, with its exit status checked."""
    err = io.StringIO()
    with redirect_stderr(err):
        got = main([str(a) for a in argv])
    message = err.getvalue()
    assert got == code, (got, message)
    assert message.startswith("error: ") and message.count("\n") == 1, message
    return message.strip()


# ----------------------------------------------------------------------------- sample.py


def test_lora_changes_pixels_and_is_recorded(tiny_model_dir, loras, tmp_path, capsys):
    [plain] = run(tiny_model_dir, tmp_path / "plain", "--prompt", PROMPT)
    [adapted] = run(tiny_model_dir, tmp_path / "lora", "--prompt", PROMPT, "--lora", f"{loras / 'cyan.safetensors'}:0.7")
    assert not np.array_equal(pixels(plain), pixels(adapted))
    assert "LoRA cyan ×0.7: 32 U-Net layers" in capsys.readouterr().err
    with Image.open(adapted) as im:
        text = im.info["parameters"]
    h = short_hash(loras / "cyan.safetensors")
    assert text.splitlines()[0] == f"{PROMPT} <lora:cyan:0.7>"
    assert f'Lora hashes: "cyan: {h}"' in text
    params = read_png_params(adapted)
    assert (params.prompt, params.loras) == (PROMPT, (("cyan", 0.7, h),))


def test_from_png_reapplies_the_adapters(tiny_model_dir, loras, tmp_path, capsys):
    [first] = run(tiny_model_dir, tmp_path, "--prompt", PROMPT, "--seed", "3", "--lora", f"{loras / 'cyan.safetensors'}:0.7")
    [again] = run(tiny_model_dir, tmp_path, "--from-png", first, "--lora-dir", loras)
    assert np.array_equal(pixels(first), pixels(again)) and read_png_params(again).loras == read_png_params(first).loras
    assert "warning" not in capsys.readouterr().err

    # Not found: one line naming --lora-dir, exit 1.
    message = error_of(sample.main, ["--model", tiny_model_dir, "--out", tmp_path, "--from-png", first])
    assert "LoRA 'cyan' not found" in message and "--lora-dir" in message

    # Same name, other file: used, with a warning that the pixels will differ.
    other = make_lora(load_pipeline(tiny_model_dir), tmp_path / "other" / "cyan.safetensors", seed=7)
    [changed] = run(tiny_model_dir, tmp_path, "--from-png", first, "--lora-dir", other.parent)
    err = capsys.readouterr().err
    assert f"was made with LoRA cyan hash {short_hash(loras / 'cyan.safetensors')}, but {other} is {short_hash(other)}" in err
    assert "the pixels will differ" in err and not np.array_equal(pixels(first), pixels(changed))

    # --lora next to --from-png replaces the PNG's adapters.
    [replaced] = run(tiny_model_dir, tmp_path, "--from-png", first, "--lora", f"{loras / 'ink.safetensors'}:0.5")
    assert [(n, m) for n, m, _ in read_png_params(replaced).loras] == [("ink", 0.5)]


def test_prompt_tags_equal_flags(tiny_model_dir, loras, tmp_path):
    [flags] = run(tiny_model_dir, tmp_path, "--prompt", PROMPT, "--lora", f"{loras / 'cyan.safetensors'}:0.7")
    [tagged] = run(tiny_model_dir, tmp_path, "--prompt", f"{PROMPT} <lora:cyan:0.7>", "--lora-dir", loras)
    assert np.array_equal(pixels(flags), pixels(tagged))
    assert read_png_params(tagged).prompt == PROMPT  # the text encoder never saw the tag

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} <lora:cyan:0.7>\na blue square in the center <lora:cyan:0.7>\n")
    paths = run(tiny_model_dir, tmp_path / "file", "--prompts-file", prompts, "--lora-dir", loras)
    assert [p.prompt for p in map(read_png_params, paths)] == [PROMPT, "a blue square in the center"]
    assert np.array_equal(pixels(paths[0]), pixels(flags))
    prompts.write_text(f"{PROMPT} <lora:cyan:0.7>\na blue square in the center\n")
    message = error_of(sample.main, ["--model", tiny_model_dir, "--prompts-file", prompts, "--lora-dir", loras], code=2)
    assert "prompt 2 carries no tags but prompt 1 carries <lora:cyan:0.7>" in message


def test_two_adapters_stack(tiny_model_dir, loras, tmp_path, capsys):
    cyan, ink = f"{loras / 'cyan.safetensors'}:0.5", f"{loras / 'ink.safetensors'}:0.5"
    [both] = run(tiny_model_dir, tmp_path, "--prompt", PROMPT, "--lora", cyan, "--lora", ink)
    assert "LoRA cyan ×0.5: 32 U-Net layers\nLoRA ink ×0.5: 32 U-Net layers, 8 text-encoder layers" in capsys.readouterr().err
    [one] = run(tiny_model_dir, tmp_path, "--prompt", PROMPT, "--lora", cyan)
    assert not np.array_equal(pixels(both), pixels(one))
    text = Image.open(both).info["parameters"]
    assert text.splitlines()[0] == f"{PROMPT} <lora:cyan:0.5> <lora:ink:0.5>"
    assert f'Lora hashes: "cyan: {short_hash(loras / "cyan.safetensors")}, ink: {short_hash(loras / "ink.safetensors")}"' in text
    [tags] = run(tiny_model_dir, tmp_path, "--prompt", f"{PROMPT} <lora:cyan:0.5> <lora:ink:0.5>", "--lora-dir", loras)
    [again] = run(tiny_model_dir, tmp_path, "--from-png", tags, "--lora-dir", loras)
    assert np.array_equal(pixels(both), pixels(tags)) and np.array_equal(pixels(both), pixels(again))


def test_bad_adapters_are_one_line(tiny_model_dir, tiny_config, loras, tmp_path):
    base = ["--model", tiny_model_dir, "--out", tmp_path, "--prompt", PROMPT, "--lora"]
    assert error_of(sample.main, [*base, tmp_path / "nope.safetensors"]) == f"error: LoRA file not found: {tmp_path / 'nope.safetensors'}"
    message = error_of(sample.main, [*base, f"{loras / 'cyan.safetensors'}:abc"])
    assert "the scale 'abc' is not a number" in message and f"{loras / 'cyan.safetensors'}:0.8" in message
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"not a safetensors file")
    assert "only .safetensors LoRA files are read" in error_of(sample.main, [*base, pickled])
    assert "carries no tags" not in error_of(sample.main, [*base[:-1], "--prompt", "x <lora:cyan:big>"], code=2)

    # An adapter made for a model of another width names the first layer that does not fit.
    cfg = tiny_config.pipeline_config()
    narrow = Pipeline(dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, model_channels=16)))
    other = make_lora(narrow, tmp_path / "narrow.safetensors")
    message = error_of(sample.main, [*base, other])
    assert "LoRA narrow: layer lora_unet_" in message and "was the adapter made for another base model?" in message
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------- convert, eval, app


def test_convert_merge_lora_bakes_the_adapters(tiny_model_dir, loras, tmp_path, capsys):
    from diffusion.convert import main as convert_main

    spec = f"{loras / 'cyan.safetensors'}:0.7"
    assert convert_main([str(tiny_model_dir), str(tmp_path / "merged"), "--to", "native", "--merge-lora", spec]) == 0
    assert "LoRA cyan ×0.7: 32 U-Net layers" in capsys.readouterr().err
    merged = load_pipeline(tmp_path / "merged")
    assert f"merged LoRA cyan ×0.7 ({short_hash(loras / 'cyan.safetensors')})" in merged.cfg.info.trained_on
    [baked] = run(tmp_path / "merged", tmp_path, "--prompt", PROMPT)
    [applied] = run(tiny_model_dir, tmp_path, "--prompt", PROMPT, "--lora", spec)
    assert np.array_equal(pixels(baked), pixels(applied))  # the same fp64 merge, saved in fp32
    assert read_png_params(baked).loras == ()  # the adapter is the model's own weights now
    single = tmp_path / "merged.safetensors"
    assert convert_main([str(tiny_model_dir), str(single), "--to", "single-file", "--merge-lora", spec]) == 0
    assert "merged LoRA cyan" in load_pipeline(single).cfg.info.trained_on
    [from_single] = run(single, tmp_path, "--prompt", PROMPT)
    assert np.abs(pixels(from_single) - pixels(applied)).max() <= 1
    message = error_of(convert_main, [tiny_model_dir, tmp_path / "x", "--to", "native", "--merge-lora", tmp_path / "no.safetensors"])
    assert "LoRA file not found" in message and not (tmp_path / "x").exists()


def test_eval_lora_is_applied_and_reported(tiny_model_dir, loras, capsys):
    from diffusion.eval.__main__ import main as eval_main

    spec = f"{loras / 'cyan.safetensors'}:0.5"
    argv = ["shapes", "--model", str(tiny_model_dir), "--device", "cpu", "--steps", "1", "--colors", "cyan", "--lora", spec]
    assert eval_main(argv) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["loras"] == [{"name": "cyan", "multiplier": 0.5, "hash": short_hash(loras / "cyan.safetensors")}]
    assert result["n"] == 15
    assert "LoRA cyan ×0.5" in out.err


def test_app_picker_and_tags(tiny_model_dir, loras, tmp_path):
    pipe = load_pipeline(tiny_model_dir, "cpu")
    assert app.lora_choices(str(loras)) == ["None", "cyan", "ink"] and app.lora_choices(None) == ["None"]

    def request(prompt, lora="None", scale=1.0, lora_dir=str(loras)):
        gallery, _, params = app.generate_gallery(pipe, prompt, "", "ddim", 2, 3.0, 0.0, 5, 1, 16, 16, lambda *a, **k: None,
                                                  lora, scale, lora_dir)
        return np.asarray(gallery[0][0]).astype(int), params

    base, text = request(PROMPT)
    assert "<lora:" not in text and "**LoRA:**" not in app.model_card(pipe)
    picked, text = request(PROMPT, "cyan", 0.7)
    assert text.splitlines()[0] == f"{PROMPT} <lora:cyan:0.7>" and "Lora hashes" in text
    assert f"**LoRA:** cyan ×0.7 ({short_hash(loras / 'cyan.safetensors')})" in app.model_card(pipe)
    [cli] = run(tiny_model_dir, tmp_path, "--prompt", PROMPT, "--seed", "5", "--guidance", "3", "--lora", f"{loras / 'cyan.safetensors'}:0.7")
    assert np.array_equal(picked, pixels(cli))  # the same generate() as sample.py
    tagged, text = request(f"{PROMPT} <lora:cyan:0.7>")
    assert np.array_equal(tagged, picked) and text.splitlines()[0] == f"{PROMPT} <lora:cyan:0.7>"
    again, _ = request(PROMPT)  # "None" takes the adapter out again, exactly
    assert np.array_equal(again, base) and pipe.loras == []


def test_app_lora_dir_must_be_a_folder(tmp_path, capsys):
    assert app.main(["--model", str(tmp_path), "--lora-dir", str(tmp_path / "nope")]) == 2
    assert "--lora-dir" in capsys.readouterr().err


def test_tags_are_found_beside_the_lora_files(tiny_model_dir, loras, tmp_path):
    """Without --lora-dir, tags are looked up in the folders of the --lora files."""
    [path] = run(tiny_model_dir, tmp_path / "out", "--prompt", f"{PROMPT} <lora:ink:0.5>", "--lora", loras / "cyan.safetensors")
    assert [(n, m) for n, m, _ in read_png_params(path).loras] == [("cyan", 1.0), ("ink", 0.5)]
