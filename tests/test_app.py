"""app.py: the Gradio demo on the tiny saved pipeline, driven through gradio_client and a real browser."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from diffusion import registry  # noqa: E402
from diffusion.infotext import read_png_params  # noqa: E402
from diffusion.pipeline import load_pipeline  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    """The saved tiny model (so images carry its hash), defaulting to 2 steps to keep the tests quick."""
    pipe = load_pipeline(tiny_model_dir, "cpu")
    pipe.cfg = dataclasses.replace(pipe.cfg, sampling=dataclasses.replace(pipe.cfg.sampling, steps=2))
    return pipe


@pytest.fixture(scope="module")
def server(pipeline):
    demo = app.build_demo(pipeline)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def generate(client, prompt="a red circle", negative="", sampler="ddim", steps=2, guidance=2.0, eta=0.0, seed=5,
             num_images=2, height=16, width=16, lora="None", lora_scale=1.0):
    return client.predict(prompt, negative, sampler, steps, guidance, eta, seed, num_images, height, width, lora, lora_scale,
                          api_name="/generate")


# ----------------------------------------------------------------------------- the API endpoint


@pytest.mark.slow
def test_client_gets_pngs_with_parameters(client, pipeline):
    gallery, seed_used, params_text = generate(client, negative="blurry", sampler="ddpm", seed=5, num_images=2, width=8)
    assert seed_used == 5 and len(gallery) == 2
    expected = pipeline.generate(["a red circle"] * 2, negative_prompt="blurry", sampler="ddpm", steps=2, guidance=2.0,
                                 eta=0.0, seed=5, height=16, width=8)
    for i, (item, want) in enumerate(zip(gallery, expected)):
        path = item["image"]
        assert path.endswith(".png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (8, 16)
            assert im.info["parameters"] == want.info["parameters"] == item["caption"]
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want))  # the shared generate()
        p = read_png_params(path)
        assert (p.prompt, p.negative_prompt, p.sampler, p.seed, p.model_hash) == ("a red circle", "blurry", "ddpm", 5 + i, pipeline.model_hash)
    assert params_text == "\n\n".join(item["caption"] for item in gallery)


@pytest.mark.slow
def test_random_seed_is_shown_and_recorded(client):
    gallery, seed_used, _ = generate(client, seed=-1, num_images=1)
    assert seed_used >= 0 and read_png_params(gallery[0]["image"]).seed == seed_used


@pytest.mark.slow
def test_empty_prompt_generates_unconditionally(client):
    gallery, _, _ = generate(client, prompt="", num_images=1)
    assert read_png_params(gallery[0]["image"]).prompt == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "less than minimum value 1"),
        ({"guidance": -1.0}, "less than minimum value 0"),
        ({"guidance": app.MAX_GUIDANCE + 1}, "greater than maximum value"),
        ({"eta": 1.5}, "greater than maximum value 1"),
        ({"num_images": app.MAX_IMAGES + 1}, "greater than maximum value 8"),
        ({"height": 15}, "multiples of the VAE factor 2"),
        ({"width": 16 * app.MAX_SIZE_RATIO + 2}, "greater than maximum value 32"),
        ({"seed": -2}, "less than minimum value -1"),
    ],
)
def test_out_of_range_is_rejected_with_a_message(client, change, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message.replace(".", r"\.").replace("(", r"\(")):
        generate(client, **change)


# ----------------------------------------------------------------------------- the page


@pytest.mark.slow
def test_page_shows_the_model_and_example_prompts(pipeline):
    demo = app.build_demo(pipeline)
    props = [c.get("props", {}) for c in demo.config["components"]]
    card = next(p["value"] for p in props if "**Model:** tiny" in str(p.get("value")))
    assert "16×16" in card and "nothing (random weights)" in card and pipeline.model_hash in card
    assert ["a red circle in the center"] in [s for p in props for s in p.get("samples") or []]  # ModelInfo.example_prompts
    assert demo._queue.max_size == app.QUEUE_SIZE
    assert [fn.concurrency_limit for fn in demo.fns.values() if fn.api_name == "generate"] == [1]
    dropdown = next(p for p in props if p.get("label") == "Sampler")
    assert [name for name, _ in dropdown["choices"]] == [s.name for s in registry.SAMPLERS]
    # Picking a sampler sets its own default step count (DPM++ 20, DDIM 50), as the web UI does.
    [on_change] = [fn for fn in demo.fns.values() if fn.name == "<lambda>"]
    assert on_change.fn("dpmpp_2m_karras") == 20 and on_change.fn("ddim") == 50


@pytest.mark.slow
def test_lora_picker_lists_the_folder(pipeline, tmp_path):
    props = [c.get("props", {}) for c in app.build_demo(pipeline).config["components"]]
    assert [p.get("visible") for p in props if str(p.get("label")).startswith("LoRA ")] == [False, False]  # no --lora-dir
    for name in ("ink", "cyan"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an adapter")
    props = [c.get("props", {}) for c in app.build_demo(pipeline, str(tmp_path)).config["components"]]
    picker = next(p for p in props if p.get("label") == f"LoRA (from {tmp_path})")
    assert [value for _, value in picker["choices"]] == ["None", "cyan", "ink"] and picker["value"] == "None"
    slider = next(p for p in props if p.get("label") == "LoRA multiplier")
    assert (slider["minimum"], slider["maximum"], slider["step"], slider["value"]) == (0.0, 2.0, 0.05, 1.0)


def _chromium_or_skip():
    if os.path.exists(CHROMIUM):
        return
    if shutil.which("apt-get"):
        pytest.fail(f"{CHROMIUM} is missing; install it with: apt-get update && apt-get install -y chromium")
    pytest.skip(f"{CHROMIUM} is missing and apt-get is not available to install it")


@pytest.mark.slow
def test_browser_generates_an_image(server):
    _chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page()
            page.goto(server, timeout=60_000)
            expect(page.get_by_text("Trained on:", exact=False)).to_be_visible(timeout=60_000)
            page.get_by_label("Prompt", exact=True).fill("a red circle in the top left")
            page.get_by_role("button", name="Generate").click()
            images = page.locator("#results img")
            expect(images.first).to_be_visible(timeout=120_000)
            assert images.count() == 4  # the default number of images
            seed = page.get_by_label("Seed used").input_value()
            assert int(seed) >= 0
        finally:
            browser.close()


# ----------------------------------------------------------------------------- start-up


@pytest.mark.slow
def test_main_binds_localhost_by_default(tiny_model_dir, monkeypatch):
    import gradio as gr

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    app.main(["--model", str(tiny_model_dir), "--device", "cpu"])
    assert calls == [{"server_name": "127.0.0.1", "server_port": 7860, "share": False}]


def test_missing_model_is_one_line_and_nonzero(tmp_path, capsys):
    assert app.main(["--model", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err == f"error: model folder not found: {tmp_path / 'nope'}\n"
