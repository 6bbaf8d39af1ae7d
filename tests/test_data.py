"""Image-caption folders: every format and mode loads, every kind of junk is skipped with its reason,
transforms do what the config says, and the report CLI ends with its summary line."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config import DataConfig
from diffusion.data import (
    DataError,
    ImageCaptionDataset,
    image_transform,
    index_folder,
    load_image,
)
from diffusion.data.__main__ import main as report_main

ROOT = Path(__file__).resolve().parents[1]

# Files of the messy folder that must be used, with their captions.
GOOD = {
    "a_rgb.jpg": ["a photo of a cat"],
    "b_cmyk.jpg": ["cmyk red"],
    "c_16bit.png": ["sixteen bit"],
    "d_la.png": ["gray with alpha"],
    "e_palette.png": ["palette with transparency"],
    "f_rgba.png": ["rgba"],
    "g_exif.jpg": ["rotated"],
    "h_anim.gif": ["animated"],
    "i_webp.webp": ["webp"],
    "j_bmp.bmp": ["bmp"],
    "k_tiff.tiff": ["tiff"],
    "multi.png": ["one", "two", "three"],
    "bom.png": ["bom caption"],
    "sub/deeper/nested.jpg": ["nested"],
    "hf/x.png": ["jsonl one", "jsonl two"],  # from metadata.jsonl, which beats hf/x.txt
    "hf/y.png": ["jsonl single"],
    "csv/z.png": ["csv caption"],
}
# Files that must be skipped, with the start of their reason.
BAD = {
    "badutf.png": "caption not valid UTF-8",
    "zero.png": "empty file",
    "trunc.png": "truncated",
    "trunc.jpg": "truncated",
    "fake.png": "not an image",
    "tiny.png": "too small",
    "bomb.png": "decompression bomb",
    "hf/gone.png": "missing file",
    "hf/metadata.jsonl": "bad metadata",
}
UNCAPTIONED = ["emptycap.png", "nocap.png"]


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _make_messy(root: Path) -> None:
    """Every layout, format, mode and kind of junk the loader must handle."""
    _write_good_images(root)
    _write_captions(root)
    _write_junk(root)


def _write_good_images(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "hf").mkdir()
    (root / "csv").mkdir()
    (root / ".hidden").mkdir()
    red = Image.new("RGB", (24, 24), (255, 0, 0))

    _noise((40, 30)).save(root / "a_rgb.jpg")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "b_cmyk.jpg")
    Image.fromarray(np.full((24, 24), 65535, dtype=np.uint16)).save(root / "c_16bit.png")
    la = Image.new("LA", (24, 24), (0, 255))
    la.putpixel((0, 0), (0, 0))  # transparent black -> white
    la.save(root / "d_la.png")
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 1  # the red index is transparent
    pal.save(root / "e_palette.png", transparency=1)
    rgba = Image.new("RGBA", (24, 24), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(root / "f_rgba.png")
    # Stored 40 wide x 20 high with a red left half; orientation 6 means "rotate 90 degrees clockwise to view".
    exif_img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif_img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_img.save(root / "g_exif.jpg", exif=exif, quality=95)
    frames = [red, Image.new("RGB", (24, 24), (0, 0, 255))]
    frames[0].save(root / "h_anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    red.save(root / "i_webp.webp")
    red.save(root / "j_bmp.bmp")
    red.save(root / "k_tiff.tiff")
    red.save(root / "multi.png")
    red.save(root / "bom.png")
    _noise((24, 24)).save(root / "sub" / "deeper" / "nested.jpg")
    red.save(root / "hf" / "x.png")
    red.save(root / "hf" / "y.png")
    red.save(root / "csv" / "z.png")
    red.save(root / ".hidden" / "ignored.png")


def _write_captions(root: Path) -> None:
    captions = {name: "\n".join(caps) for name, caps in GOOD.items() if not name.startswith(("hf/", "csv/"))}
    captions["multi.png"] = "one\n two \n\nthree\n"
    for name, text in captions.items():
        ext = ".caption" if name == "b_cmyk.jpg" else ".txt"
        (root / name).with_suffix(ext).write_text(text, encoding="utf-8")
    (root / "bom.txt").write_bytes("\ufeffbom caption  \r\n".encode("utf-8"))
    (root / "hf" / "x.txt").write_text("the sidecar loses to metadata")
    lines = [
        {"file_name": "x.png", "text": ["jsonl one", " jsonl two "]},
        {"file_name": "y.png", "text": "jsonl single"},
        {"file_name": "gone.png", "text": "listed but missing"},
    ]
    (root / "hf" / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{not json\n")
    (root / "csv" / "metadata.csv").write_text('file_name,text\nz.png,"csv caption"\n')


def _write_junk(root: Path) -> None:
    """Each with a caption, so that only the image itself is at fault; then images with no usable caption."""
    red = Image.new("RGB", (24, 24), (255, 0, 0))
    red.save(root / "badutf.png")
    (root / "badutf.txt").write_bytes(b"caf\xe9 latin-1")
    (root / "zero.png").write_bytes(b"")
    (root / "trunc.png").write_bytes(_png_bytes(_noise((32, 32)))[:1500])
    (root / "trunc.jpg").write_bytes(_png_bytes(_noise((32, 32)), "JPEG")[:-200])
    (root / "fake.png").write_text("this is not a png")
    Image.new("RGB", (4, 4)).save(root / "tiny.png")
    # Just over PIL's bomb limit, yet ~11 kB on disk: 1-bit and all zeros.
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 1
    Image.new("1", (side, side)).save(root / "bomb.png")
    for name in ["zero", "trunc", "fake", "tiny", "bomb"]:
        (root / f"{name}.txt").write_text("junk")

    red.save(root / "nocap.png")
    red.save(root / "emptycap.png")
    (root / "emptycap.txt").write_text("  \n\n")


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    _make_messy(root)
    return root


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


# ----------------------------------------------------------------------------- indexing


def test_index_uses_every_good_file_and_reports_every_bad_one(messy):
    index = index_folder(messy, DataConfig(missing_caption="skip"))
    got = {_rel(messy, p): caps for p, caps in index.items}
    assert got == GOOD
    reasons = {_rel(messy, p): r for p, r in index.skipped}
    for name, reason in BAD.items():
        assert reasons.pop(name).startswith(reason), (name, reasons)
    assert sorted(reasons) == UNCAPTIONED and all(r.startswith("no caption") for r in reasons.values())
    assert "emptycap" in str(index.uncaptioned[0]) and "empty" in reasons["emptycap.png"]
    assert index.formats == {"JPEG": 4, "PNG": 9, "GIF": 1, "WEBP": 1, "BMP": 1, "TIFF": 1}
    report = index.report()
    assert report.splitlines()[-1] == f"usable: {len(GOOD)}  skipped: {len(BAD) + 2}"
    for reason in BAD.values():
        assert reason in report


def test_index_is_sorted_and_deterministic(messy):
    a = index_folder(messy, DataConfig(missing_caption="empty"))
    b = index_folder(messy, DataConfig(missing_caption="empty", num_workers=2))  # threaded checks
    assert a.items == b.items and a.skipped == b.skipped
    names = [_rel(messy, p) for p, _ in a.items]
    assert names == sorted(names)


def test_missing_caption_policies(messy):
    with pytest.raises(DataError) as e:
        index_folder(messy, DataConfig(missing_caption="error"))
    msg = str(e.value)
    assert "\n" not in msg and "emptycap.png" in msg and "nocap.png" in msg and "missing_caption" in msg

    empty = index_folder(messy, DataConfig(missing_caption="empty"))
    got = {_rel(messy, p): caps for p, caps in empty.items}
    assert got["nocap.png"] == [""] and got["emptycap.png"] == [""]
    assert len(empty.items) == len(GOOD) + 2 and len(empty.skipped) == len(BAD)

    report_mode = index_folder(messy, DataConfig(missing_caption="error"), strict=False)
    assert len(report_mode.items) == len(GOOD) and "training stops" in report_mode.report()


def test_min_size_is_configurable(messy):
    index = index_folder(messy, DataConfig(missing_caption="skip", min_size=2))
    assert "tiny.png" in {_rel(messy, p) for p, _ in index.items}
    index = index_folder(messy, DataConfig(missing_caption="skip", min_size=25))
    assert {_rel(messy, p) for p, _ in index.items} == {"a_rgb.jpg"}  # the only image with both sides >= 25


def test_bad_paths_raise_one_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        index_folder(tmp_path / "nope", DataConfig())
    with pytest.raises(DataError, match="no images"):
        index_folder(tmp_path, DataConfig())
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="no usable image-caption pairs") as e:
        index_folder(tmp_path, DataConfig())
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- loading


def test_modes_convert_to_rgb(messy):
    px = lambda name, xy=(12, 12): load_image(messy / name).getpixel(xy)  # noqa: E731
    for name in GOOD:
        assert load_image(messy / name).mode == "RGB", name
    assert px("c_16bit.png") == (255, 255, 255)  # scaled from 65535, not clipped from it
    assert px("d_la.png") == (0, 0, 0) and px("d_la.png", (0, 0)) == (255, 255, 255)
    assert px("e_palette.png") == (255, 255, 255) and px("e_palette.png", (0, 0)) == (255, 255, 255)
    assert px("f_rgba.png") == (0, 0, 255) and px("f_rgba.png", (0, 0)) == (255, 255, 255)
    assert abs(px("f_rgba.png", (1, 0))[0] - 127) <= 1  # half-transparent black over white
    r, g, b = px("b_cmyk.jpg")
    assert r > 200 and g < 60 and b < 60
    assert px("h_anim.gif") == (255, 0, 0)  # the first frame


def test_exif_orientation_is_applied(messy):
    img = load_image(messy / "g_exif.jpg")
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


# ----------------------------------------------------------------------------- transforms


def _stripes(w: int, h: int) -> Image.Image:
    """Thirds: red, green, blue from left to right."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for k in range(3):
        arr[:, k * w // 3 : (k + 1) * w // 3, k] = 255
    return Image.fromarray(arr)


def test_transform_shape_range_and_center_crop():
    x = image_transform(_stripes(48, 16), 16, "center")
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]))  # the green middle third
    big = image_transform(_stripes(96, 32), 16, "center")  # resized shorter side first
    assert big.shape == (3, 16, 16) and torch.allclose(big[:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)


def test_random_crop_follows_torch_seed():
    img = _stripes(48, 16)
    torch.manual_seed(0)
    lefts = {tuple(image_transform(img, 16, "random")[:, 8, 0].tolist()) for _ in range(30)}
    assert len(lefts) > 1  # the crop moves
    torch.manual_seed(0)
    a = image_transform(img, 16, "random")
    torch.manual_seed(0)
    assert torch.equal(a, image_transform(img, 16, "random"))


# ----------------------------------------------------------------------------- dataset


def _folder(root: Path, n: int = 4) -> Path:
    root.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"caption {i}\nalt {i}\n")
    return root


def test_dataset_items_and_captions(tmp_path):
    root = _folder(tmp_path / "d")
    index = index_folder(root, DataConfig())
    ds = ImageCaptionDataset(index, DataConfig(resolution=8, caption_dropout=1.0, flip=True))
    item = ds[1]
    assert item["pixels"].shape == (3, 8, 8) and item["index"] == 1
    # No augmentation here: training draws flips and captions from its own generator (diffusion.train.augment).
    assert {ds[1]["caption"] for _ in range(10)} == {"caption 1"} and all(torch.equal(ds[1]["pixels"], item["pixels"]) for _ in range(5))
    assert ds.captions(1) == ["caption 1", "alt 1"]
    evaluation = ImageCaptionDataset(index, DataConfig(resolution=8), train=False)
    assert torch.equal(evaluation.pixels_for_cache(2), evaluation[2]["pixels"])
    with pytest.raises(ValueError, match="crop=center"):
        ImageCaptionDataset(index, DataConfig(crop="random")).pixels_for_cache(0)


def test_dataset_survives_a_file_that_breaks_mid_epoch(tmp_path, caplog):
    root = _folder(tmp_path / "d")
    ds = ImageCaptionDataset(index_folder(root, DataConfig()), DataConfig(resolution=8))
    (root / "1.png").write_bytes(b"corrupted after indexing")
    with caplog.at_level(logging.WARNING, logger="diffusion.data.folder"):
        assert ds[1]["index"] == 2 and ds[1]["index"] == 2
        assert ds.pixels_for_cache(1) is None
    assert len([r for r in caplog.records if "1.png" in r.getMessage()]) == 1  # warned once per file
    assert [ds[i]["index"] for i in (0, 2, 3)] == [0, 2, 3]


# ----------------------------------------------------------------------------- report CLI


@pytest.mark.slow
def test_report_cli(messy):
    # One real `python -m` run (most of its time is importing torch); the exit codes are checked in-process below.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "diffusion.data", "check", str(messy)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == f"usable: {len(GOOD)}  skipped: {len(BAD) + 2}"
    assert any(line.strip().startswith("truncated: 2") for line in lines)
    assert "words min" in run.stdout and "PNG 9" in run.stdout


def test_report_cli_flags_and_exit_codes(messy, tmp_path, capsys):
    assert report_main(["check", str(messy), "--missing-caption", "empty", "--min-size", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"usable: {len(GOOD) + 3}  skipped: {len(BAD) - 1}"

    for folder, message in [(tmp_path / "nope", "not found"), (tmp_path, "no images")]:
        assert report_main(["check", str(folder)]) == 1
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1 and message in out.err

    (tmp_path / "fake.png").write_text("not an image")
    assert report_main(["check", str(tmp_path)]) == 1  # nothing usable: the report, then one error line
    out = capsys.readouterr()
    assert out.out.splitlines()[-1] == "usable: 0  skipped: 1" and len(out.err.strip().splitlines()) == 1
