"""The built-in shapes dataset and its pixel evaluator: deterministic files, captions that match their
pixels, held-out pairs kept out, and an evaluator that scores the dataset and tolerates blur and noise."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from diffusion.config import DataConfig, ShapesConfig
from diffusion.data import (
    COLORS,
    POSITIONS,
    SHAPES,
    all_prompts,
    caption,
    ensure_shapes,
    generate_shapes,
    index_folder,
    parse_caption,
)
from diffusion.data.shapes import DEFAULT_COLORS, RECIPE_FILE, draw_shape
from diffusion.eval.shapes import classify, score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes300(tmp_path_factory) -> tuple[list[Image.Image], list[str]]:
    out = tmp_path_factory.mktemp("shapes")
    captions = generate_shapes(out, 300, size=32, seed=0)
    images = [Image.open(p).convert("RGB") for p in sorted(out.glob("*.png"))]
    assert [p.read_text().strip() for p in sorted(out.glob("*.txt"))] == captions
    return images, captions


def test_prompts_and_captions_round_trip():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 90 == len(DEFAULT_COLORS) * len(SHAPES) * len(POSITIONS)
    assert prompts[0] == "a red circle in the center"
    assert caption("red", "circle", "top left") == "a red circle in the top left"
    assert [caption(*parse_caption(p)) for p in prompts] == prompts
    with pytest.raises(ValueError):
        parse_caption("a cat on a mat")


def test_drawing_matches_the_spec():
    img = np.asarray(draw_shape("purple", "triangle", (0.5, 0.5), 0.4, size=40))
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[24, 20]) == COLORS["purple"]
    rows = (img.max(axis=2) > 0).sum(axis=1)
    assert rows[13] < rows[26]  # pointing up: narrow at the top, wide at the bottom
    edge = img.max(axis=2)
    assert ((edge > 0) & (edge < 150)).any()  # anti-aliased edge pixels


def test_same_seed_same_bytes(tmp_path):
    def files(seed: int, name: str) -> dict[str, bytes]:
        generate_shapes(tmp_path / name, 12, size=32, seed=seed)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    a, b, c = files(3, "a"), files(3, "b"), files(4, "c")
    assert a == b and len(a) == 24
    assert a != c


def test_every_caption_matches_its_pixels(shapes300):
    images, captions = shapes300
    got = [classify(img) for img in images]
    wrong = [t for g, t in zip(got, captions) if (g["color"], g["shape"], g["position"]) != parse_caption(t)]
    assert not wrong  # the spec asks >= 98%; the clean dataset scores 100%
    result = score(images[:100], captions[:100])
    assert result["all"] == result["color"] == result["shape_fill"] == 1.0 and result["correct"]["all"] == 100
    assert result["n"] == 100 and result["fill"] == {"circle": 1.0, "square": 1.0, "triangle": 1.0}
    fills = {s: [g["fill"] for g, t in zip(got, captions) if parse_caption(t)[1] == s] for s in SHAPES}
    assert min(fills["square"]) > 0.98 and 0.75 < min(fills["circle"]) <= max(fills["circle"]) < 0.82
    assert max(fills["triangle"]) < 0.62
    assert {p for p in (parse_caption(t)[2] for t in captions)} == set(POSITIONS)


def test_evaluator_tolerates_blur_and_noise(shapes300):
    images, captions = shapes300
    rng = np.random.default_rng(0)
    rough = []
    for img in images[:90]:
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64) * 0.85 + 15
        rough.append(Image.fromarray(np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)))
    result = score(rough, captions[:90])
    assert result["all"] >= 0.95 and result["shape_fill"] >= 0.95


def _pinched_square(depth: float, size: int = 32) -> Image.Image:
    """A white square whose four sides bow inwards by `depth` of its side at their midpoints."""
    big, n = size * 4, 64
    c, h = big / 2, 0.4 * big / 2
    t = np.linspace(-1, 1, n, endpoint=False)
    bow = depth * 2 * h * (1 - t**2)  # zero at the corners, `depth` of the side at the middle
    sides = [(c + t * h, c - h + bow), (c + h - bow, c + t * h), (c - t * h, c + h - bow), (c - h + bow, c - t * h)]
    points = [(float(x), float(y)) for xs, ys in sides for x, y in zip(xs, ys)]
    img = Image.new("RGB", (big, big))
    ImageDraw.Draw(img).polygon(points, fill=COLORS["white"])
    return img.resize((size, size), Image.Resampling.BOX)


def test_fill_test_rejects_pinched_squares():
    prompt = ["a white square in the center"]
    straight, pinched = _pinched_square(0.0), _pinched_square(0.12)
    assert classify(straight)["shape"] == classify(pinched)["shape"] == "square"  # the template fit accepts both
    assert classify(straight)["fill"] > 0.97 and classify(pinched)["fill"] < 0.89
    assert score([straight], prompt)["shape_fill"] == 1.0
    assert score([pinched], prompt)["shape_fill"] == 0.0 and score([pinched], prompt)["shape"] == 1.0
    assert score([pinched], prompt)["fill"] == {"square": 0.0}


def test_evaluator_inputs_and_empty_images(shapes300):
    import torch

    images, captions = shapes300
    tensor = torch.from_numpy(np.array(images[0])).permute(2, 0, 1).float() / 127.5 - 1
    want = dict(zip(("color", "shape", "position"), parse_caption(captions[0])))
    from_tensor, from_pil = classify(tensor), classify(images[0])
    assert from_tensor.pop("fill") == pytest.approx(from_pil.pop("fill"), abs=0.01)
    assert from_tensor == from_pil == want
    blank = Image.new("RGB", (32, 32))
    assert classify(blank) == {"color": None, "shape": None, "position": None, "fill": None}
    result = score([blank, images[0]], ["a red circle in the center", captions[0]])
    assert result["all"] == 0.5 and result["correct"]["color"] == 1


def test_held_out_pairs_are_absent(tmp_path):
    captions = generate_shapes(tmp_path, 150, held_out=("red circle", "Blue square"))
    pairs = {parse_caption(t)[:2] for t in captions}
    assert ("red", "circle") not in pairs and ("blue", "square") not in pairs
    assert len(pairs) == len(DEFAULT_COLORS) * len(SHAPES) - 2  # every other pair still appears
    with pytest.raises(ValueError, match="color"):
        generate_shapes(tmp_path / "x", 5, held_out=("red hexagon",))


def test_ensure_shapes(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "shapes"), resolution=16, shapes=ShapesConfig(generate=True, num=20, seed=1))
    assert ensure_shapes(cfg) is True
    index = index_folder(cfg.path, cfg)
    assert len(index.items) == 20 and Image.open(index.items[0][0]).size == (16, 16)
    assert ensure_shapes(cfg) is False  # already there
    assert not [p for p in tmp_path.iterdir() if p.name != "shapes"]  # no temp dir left behind
    (tmp_path / "empty").mkdir()
    assert ensure_shapes(DataConfig(path=str(tmp_path / "empty"), shapes=ShapesConfig(generate=True, num=5))) is True
    assert ensure_shapes(DataConfig(path=str(tmp_path / "off"))) is False and not (tmp_path / "off").exists()


def test_ensure_shapes_refuses_a_folder_made_with_other_settings(tmp_path):
    from diffusion.data import DataError

    cfg = DataConfig(path=str(tmp_path / "shapes"), resolution=16, shapes=ShapesConfig(generate=True, num=6, seed=1))
    assert ensure_shapes(cfg) is True
    assert ensure_shapes(cfg) is False  # the same settings reuse it
    reseeded = DataConfig(path=cfg.path, resolution=16, shapes=ShapesConfig(generate=True, num=6, seed=2))
    with pytest.raises(DataError, match=r"data.shapes.seed=1, but the config asks for 2; set data.path"):
        ensure_shapes(reseeded)
    held = DataConfig(path=cfg.path, resolution=16, shapes=ShapesConfig(generate=True, num=6, seed=1, held_out=("red circle",)))
    with pytest.raises(DataError, match="data.shapes.held_out"):
        ensure_shapes(held)
    with pytest.raises(DataError, match="data.resolution=16"):
        ensure_shapes(DataConfig(path=cfg.path, resolution=32, shapes=cfg.shapes))


# From the code before cyan joined the palette: the default prompts, and the pixels and captions of
# generate_shapes(num=20, size=32, seed=0). The quick start's data and model depend on both. Pixels rather
# than PNG bytes, so that another zlib does not fail the test.
_DEFAULT_PROMPTS_SHA256 = "064a9ee4b7cdb9d35bb07b7014c50d4e8331ecbeb7160ec0bb385f46107ece4a"
_DEFAULT_FOLDER_SHA256 = "745a56357c5d6c9ecbb63c2ef384586c2aa5479cde2ca8295b275e605fa50f3b"


def _folder_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for png in sorted(folder.glob("*.png")):
        h.update(np.asarray(Image.open(png).convert("RGB")).tobytes())
        h.update(png.with_suffix(".txt").read_bytes())
    return h.hexdigest()


def test_default_dataset_is_unchanged_by_the_new_color(tmp_path):
    prompts = all_prompts()
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest() == _DEFAULT_PROMPTS_SHA256
    assert prompts == all_prompts(()) == all_prompts(DEFAULT_COLORS) and not any("cyan" in p for p in prompts)
    generate_shapes(tmp_path / "a", 20, size=32, seed=0)
    generate_shapes(tmp_path / "b", 20, size=32, seed=0, colors=list(reversed(DEFAULT_COLORS)))
    assert _folder_sha256(tmp_path / "a") == _folder_sha256(tmp_path / "b") == _DEFAULT_FOLDER_SHA256


def test_cyan_dataset_is_scored_as_cyan(tmp_path):
    assert list(COLORS)[-1] == "cyan" and "cyan" not in DEFAULT_COLORS
    assert parse_caption("a cyan circle in the top left") == ("cyan", "circle", "top left")
    captions = generate_shapes(tmp_path, 45, size=32, seed=0, colors=("Cyan",))
    assert all_prompts(["cyan"]) == [caption("cyan", s, p) for s in SHAPES for p in POSITIONS]
    assert sorted(set(captions)) == sorted(all_prompts(["cyan"]))  # 3 passes over the 15 prompts
    got = [classify(Image.open(p)) for p in sorted(tmp_path.glob("*.png"))]
    wrong = [t for g, t in zip(got, captions) if (g["color"], g["shape"], g["position"]) != parse_caption(t)]
    assert not wrong
    with pytest.raises(ValueError, match="unknown color 'teal'; choose from red, green, blue, yellow, purple, white, cyan"):
        generate_shapes(tmp_path / "x", 5, colors=("teal",))
    with pytest.raises(ValueError, match="color in cyan and shape"):
        generate_shapes(tmp_path / "x", 5, colors=("cyan",), held_out=("red circle",))


def test_recipe_records_the_colors(tmp_path):
    from diffusion.config import Config, ConfigError
    from diffusion.data import DataError

    default = DataConfig(path=str(tmp_path / "shapes"), resolution=16, shapes=ShapesConfig(generate=True, num=6))
    cyan = DataConfig(path=default.path, resolution=16, shapes=ShapesConfig(generate=True, num=6, colors=("cyan",)))
    assert ensure_shapes(default) is True
    with pytest.raises(DataError, match=r"data.shapes.colors=\['red', .*'white'\], but the config asks for \['cyan'\]"):
        ensure_shapes(cyan)
    # A recipe written before colors were recorded stands for the default colors: reused, not regenerated.
    recipe = tmp_path / "shapes" / RECIPE_FILE
    recipe.write_text(json.dumps({k: v for k, v in json.loads(recipe.read_text()).items() if k != "colors"}))
    assert ensure_shapes(default) is False
    with pytest.raises(DataError, match="data.shapes.colors"):
        ensure_shapes(cyan)
    with pytest.raises(ConfigError, match="^data.shapes.colors: unknown color 'teal'; choose from red, .*, cyan$"):
        Config(data=DataConfig(shapes=ShapesConfig(colors=("teal",))))
    with pytest.raises(ConfigError, match="^data.shapes.held_out: .* with color in cyan and shape"):
        Config(data=DataConfig(shapes=ShapesConfig(colors=("cyan",), held_out=("red circle",))))


def test_colors_on_the_command_lines(tmp_path, capsys):
    from diffusion.data.__main__ import main as data_main
    from diffusion.eval.__main__ import main as eval_main
    from diffusion.eval.__main__ import select_prompts

    assert data_main(["shapes", str(tmp_path / "out"), "--num", "4", "--colors", "teal"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --colors: unknown color 'teal'; choose from red, green, blue, yellow, purple, white, cyan\n"
    assert not (tmp_path / "out").exists()
    assert data_main(["shapes", str(tmp_path / "out"), "--num", "4", "--colors", "cyan", "--colors", "white"]) == 0
    captions = [p.read_text().split()[1] for p in sorted((tmp_path / "out").glob("*.txt"))]
    assert set(captions) <= {"cyan", "white"} and len(captions) == 4

    assert select_prompts(None, 1) == all_prompts()
    cyan = select_prompts(["cyan"], 6)
    assert len(cyan) == 90 and cyan == all_prompts(["cyan"]) * 6  # image i keeps seed i: repeats get new seeds
    assert select_prompts(["cyan", "red"], 1) == all_prompts(["red"]) + all_prompts(["cyan"])
    for bad in (["--colors", "teal"], ["--repeats", "0"]):  # refused before any model is loaded
        assert eval_main(["shapes", "--model", str(tmp_path / "missing"), *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_evaluate_cli(tmp_path, capsys):
    from diffusion.eval.__main__ import main

    generate_shapes(tmp_path, 10, seed=5)
    assert main(["folder", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (
        "n=10  color 100.0%  shape 100.0%  position 100.0%  all 100.0%  shape+fill 100.0%"
    )


@pytest.mark.slow
def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "diffusion.data", "shapes", str(tmp_path / "out"), "--num", "10", "--seed", "2"]
    run = subprocess.run(cmd + ["--held-out", "red circle", "green square"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 10 and len(list((tmp_path / "out").glob("*.txt"))) == 10
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)  # refuses to overwrite
    assert again.returncode == 1 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1
