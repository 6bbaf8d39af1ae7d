"""sample.py on the tiny saved pipeline: flags, files, metadata round-trip, determinism, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from diffusion.infotext import GenerationParams, attach, read_png_params, save_png  # noqa: E402


def run(model, out, *flags) -> list[Path]:
    return sample.generate_files(["--model", str(model), "--out", str(out), "--steps", "2", *map(str, flags)])


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def error_of(argv, code: int = None) -> str:
    """The one line a bad invocation prints on stderr; checks the exit status (1 or 2, or `code`)."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        got = sample.main([str(a) for a in argv])
    message = err.getvalue()
    assert got == code if code is not None else got in (1, 2), (got, message)
    assert message.startswith("error: ") and message.count("\n") == 1, message
    return message.strip()


# ----------------------------------------------------------------------------- files and flags


def test_files_metadata_and_grid(tiny_model_dir, tmp_path, capsys):
    paths = run(
        tiny_model_dir, tmp_path, "--prompt", "a red circle in the top left", "--negative-prompt", "blurry",
        "--sampler", "ddpm", "--guidance", "2.5", "--seed", "42", "--num-images", "3", "--batch-size", "2",
        "--height", "8", "--width", "12", "--grid", "--device", "cpu", "--dtype", "fp32",
    )
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png", "00002-44.png", "grid-00000.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]  # the paths written, printed at the end
    for i, path in enumerate(paths[:3]):
        with Image.open(path) as im:
            assert im.size == (12, 8)
            text = im.info["parameters"]
        assert text.splitlines()[:2] == ["a red circle in the top left", "Negative prompt: blurry"]
        assert f"Steps: 2, Sampler: DDPM, CFG scale: 2.5, Seed: {42 + i}, Size: 12x8, Model hash: " in text
        params = read_png_params(path)  # the JSON copy
        assert (params.prompt, params.negative_prompt, params.sampler, params.seed) == (
            "a red circle in the top left", "blurry", "ddpm", 42 + i)
        assert GenerationParams.from_infotext(text) == params  # both copies agree
        # Batches of 2 then 1: where each image sat, as A1111 writes it (left out for a lone image).
        assert (params.batch_size, params.batch_pos) == [(2, 0), (2, 1), (1, 0)][i]
        assert ("Batch size: 2, Batch pos: " in text) == (i < 2)
    with Image.open(paths[3]) as grid:
        assert grid.size == (2 * 12, 2 * 8)
    assert np.array_equal(pixels(paths[3])[8:16, :12], pixels(paths[2]))  # third image: second row, first column


def test_numbers_continue_and_never_overwrite(tiny_model_dir, tmp_path):
    (tmp_path / "00041-7.png").write_bytes(b"not mine")
    (tmp_path / "notes.txt").write_text("ignored")
    first = run(tiny_model_dir, tmp_path, "--prompt", "x", "--num-images", "2", "--grid")
    second = run(tiny_model_dir, tmp_path, "--prompt", "x", "--grid")
    assert [p.name for p in first + second] == ["00042-0.png", "00043-1.png", "grid-00000.png", "00044-0.png", "grid-00001.png"]
    assert (tmp_path / "00041-7.png").read_bytes() == b"not mine"
    assert np.array_equal(pixels(first[0]), pixels(second[0]))  # same seed, same image, new name


def test_defaults_come_from_the_model(tiny_model_dir, tmp_path):
    [path] = sample.generate_files(["--model", str(tiny_model_dir), "--prompt", "", "--out", str(tmp_path)])
    p = read_png_params(path)
    # configs/tiny.yaml: ddim, 10 steps, guidance 3.0, eta 0, 16x16
    assert (p.prompt, p.sampler, p.steps, p.guidance, p.eta, p.height, p.width, p.seed) == ("", "ddim", 10, 3.0, 0.0, 16, 16, 0)
    assert p.model_name == "tiny" and len(p.model_hash) == 10


def test_prompts_file(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    paths = run(tiny_model_dir, tmp_path / "out", "--prompts-file", prompts, "--num-images", "2", "--seed", "5")
    params = [read_png_params(p) for p in paths]
    assert [(p.prompt, p.seed) for p in params] == [("a red circle", 5), ("a red circle", 6), ("a blue square", 7), ("a blue square", 8)]


def test_random_seed_is_recorded(tiny_model_dir, tmp_path):
    [path] = run(tiny_model_dir, tmp_path, "--prompt", "x", "--seed", "-1")
    seed = read_png_params(path).seed
    assert seed >= 0 and path.name == f"00000-{seed}.png"
    [again] = run(tiny_model_dir, tmp_path, "--prompt", "x", "--seed", seed)
    assert np.array_equal(pixels(path), pixels(again))


def test_eta_and_bf16(tiny_model_dir, tmp_path):
    [a] = run(tiny_model_dir, tmp_path, "--prompt", "x", "--eta", "0")
    [b] = run(tiny_model_dir, tmp_path, "--prompt", "x", "--eta", "1")
    [c] = run(tiny_model_dir, tmp_path, "--prompt", "x", "--dtype", "bf16", "--device", "cpu")
    assert read_png_params(b).eta == 1.0 and not np.array_equal(pixels(a), pixels(b))
    assert pixels(c).shape == (16, 16, 3) and read_png_params(c).seed == read_png_params(a).seed
    # bf16 rounds differently from fp32 but draws the same image from the same seed: close, not equal.
    diff = np.abs(pixels(c).astype(int) - pixels(a).astype(int))
    assert diff.mean() < 12 and pixels(c).std() > 1, (diff.mean(), pixels(c).std())


# ----------------------------------------------------------------------------- determinism and round-trip


def test_same_seed_same_images_whatever_the_batch_size(tiny_model_dir, tmp_path):
    one_by_one = run(tiny_model_dir, tmp_path / "a", "--prompt", "x", "--seed", "10", "--num-images", "3", "--batch-size", "1")
    together = run(tiny_model_dir, tmp_path / "b", "--prompt", "x", "--seed", "10", "--num-images", "2", "--batch-size", "8")
    assert [p.name for p in together] == [p.name for p in one_by_one[:2]]
    for a, b in zip(one_by_one, together):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(one_by_one[0]), pixels(one_by_one[1]))  # seeds differ, images differ


def test_from_png_regenerates_the_same_pixels(tiny_model_dir, tmp_path):
    paths = run(tiny_model_dir, tmp_path, "--prompt", "a red circle", "--negative-prompt", "a, b: c", "--seed", "3",
                "--num-images", "2", "--guidance", "4", "--eta", "0.3")
    [again] = sample.generate_files(["--from-png", str(paths[1]), "--model", str(tiny_model_dir), "--out", str(tmp_path / "again")])
    assert again.name == "00000-4.png"
    assert read_png_params(again) == read_png_params(paths[1])
    assert np.array_equal(pixels(again), pixels(paths[1]))


def test_from_png_reads_a1111_text_only(tiny_model_dir, tmp_path):
    [path] = run(tiny_model_dir, tmp_path, "--prompt", "a red circle", "--seed", "9", "--sampler", "ddpm")
    with Image.open(path) as im:
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", im.info["parameters"])  # what an A1111-style tool keeps
        im.save(tmp_path / "a1111.png", pnginfo=meta)
    [again] = sample.generate_files(["--from-png", str(tmp_path / "a1111.png"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert np.array_equal(pixels(again), pixels(path))


def test_from_png_flags_override_and_hash_mismatch_warns(tiny_model_dir, tmp_path, capsys):
    [path] = run(tiny_model_dir, tmp_path, "--prompt", "x", "--seed", "1")
    with Image.open(path) as im:
        image = im.copy()
    params = read_png_params(path)
    params.model_hash = "0123456789"
    save_png(attach(image, params), tmp_path / "other.png")
    [again] = sample.generate_files(["--from-png", str(tmp_path / "other.png"), "--model", str(tiny_model_dir),
                           "--steps", "3", "--out", str(tmp_path / "o")])
    assert read_png_params(again).steps == 3 and read_png_params(again).seed == 1
    err = capsys.readouterr().err
    assert "warning:" in err and "0123456789" in err


# ----------------------------------------------------------------------------- bad input


def test_from_png_without_model_says_to_give_one(tiny_model_dir, tmp_path):
    [path] = run(tiny_model_dir, tmp_path, "--prompt", "x")
    message = error_of(["--from-png", path])
    assert "--model" in message and "'tiny'" in message


@pytest.fixture
def bad_inputs(tiny_model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "not_a_model").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    for name, field in [("bad_batch", "Batch size: two"), ("bad_size", "Size: 16")]:
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", f"x\nSteps: 2, Sampler: DDIM, CFG scale: 3, Seed: 1, {field}")
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png", pnginfo=meta)
    m = ["--model", tiny_model_dir, "--out", tmp_path / "out"]
    return {
        "missing folder": (["--model", tmp_path / "nope", "--prompt", "x"], "model folder not found", 1),
        "not a model": (["--model", tmp_path / "not_a_model", "--prompt", "x"], "is not a model folder", 1),
        "steps < 1": ([*m, "--prompt", "x", "--steps", "0"], "steps must be between 1", 2),
        "guidance < 0": ([*m, "--prompt", "x", "--guidance", "-1"], "guidance must be >= 0", 2),
        "eta > 1": ([*m, "--prompt", "x", "--eta", "1.5"], "eta must be in [0, 1]", 2),
        "eta < 0": ([*m, "--prompt", "x", "--eta", "-0.1"], "eta must be in [0, 1]", 2),
        "num-images < 1": ([*m, "--prompt", "x", "--num-images", "0"], "--num-images must be at least 1", 2),
        "batch-size < 1": ([*m, "--prompt", "x", "--batch-size", "0"], "--batch-size must be at least 1", 2),
        "size not divisible": ([*m, "--prompt", "x", "--height", "15"], "multiples of the VAE factor 2", 2),
        "seed < -1": ([*m, "--prompt", "x", "--seed", "-2"], "seed must be -1 (random)", 2),
        "prompts file missing": ([*m, "--prompts-file", tmp_path / "nope.txt"], "cannot read --prompts-file", 1),
        "prompts file is a folder": ([*m, "--prompts-file", tmp_path], "cannot read --prompts-file", 1),
        "prompts file not UTF-8": ([*m, "--prompts-file", tmp_path / "latin1.txt"], "cannot read --prompts-file", 1),
        "prompts file empty": ([*m, "--prompts-file", tmp_path / "empty.txt"], "holds no prompts", 1),
        "png without parameters": ([*m, "--from-png", tmp_path / "plain.png"], "carries no generation parameters", 1),
        "png with a bad number": ([*m, "--from-png", tmp_path / "bad_batch.png"], "'Batch size: two' in the PNG's parameters is not an integer", 1),
        "png with a bad size": ([*m, "--from-png", tmp_path / "bad_size.png"], "'Size: 16' in the PNG's parameters is not WIDTHxHEIGHT", 1),
        "png missing": ([*m, "--from-png", tmp_path / "nope.png"], "cannot read --from-png", 1),
        "png not an image": ([*m, "--from-png", tmp_path / "empty.txt"], "cannot read --from-png", 1),
        "no model": (["--prompt", "x"], "--model DIR is required", 2),
    }


BAD = ["missing folder", "not a model", "steps < 1", "guidance < 0", "eta > 1", "eta < 0", "num-images < 1",
       "batch-size < 1", "size not divisible", "seed < -1", "prompts file missing", "prompts file is a folder",
       "prompts file not UTF-8", "prompts file empty", "png without parameters", "png with a bad number",
       "png with a bad size", "png missing", "png not an image", "no model"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_with_one_line(bad_inputs, case):
    # 2: a bad command line, nothing done; 1: a problem with a file named on it. No progress bar, no traceback.
    argv, expected, code = bad_inputs[case]
    assert expected in error_of(argv, code)


def test_bad_flag_value_is_one_line(capsys):
    assert sample.main(["--model", "m", "--prompt", "x", "--steps", "many"]) == 2
    assert capsys.readouterr().err == "error: sample.py: argument --steps: invalid int value: 'many' (see --help)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda(tiny_model_dir, tmp_path):
    assert "use --device cpu" in error_of(["--model", tiny_model_dir, "--prompt", "x", "--device", "cuda"], 2)


# ----------------------------------------------------------------------------- real processes


def script(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_subprocess_run_prints_paths_and_progress(tiny_model_dir, tmp_path):
    r = script("--model", tiny_model_dir, "--prompt", "a red circle", "--steps", "2", "--num-images", "2", "--grid", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = [tmp_path / "outputs" / n for n in ("00000-0.png", "00001-1.png", "grid-00000.png")]
    assert r.stdout.split() == [str(Path("outputs") / p.name) for p in written]
    assert all(p.is_file() for p in written)
    assert "4/4" in r.stderr  # the tqdm bar over 2 images x 2 steps


@pytest.mark.slow
def test_subprocess_bad_input_has_no_traceback(tmp_path):
    r = script("--model", tmp_path / "nope", "--prompt", "x", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == f"error: model folder not found: {tmp_path / 'nope'}\n"
