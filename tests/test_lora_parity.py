"""LoRA adapters as diffusers and peft apply them: peft adapters on a tiny random SD pipeline (U-Net attention,
feed-forward, ResBlock convolutions and proj_in; the text encoder's attention and MLP), saved in every layout
diffusers and peft write and converted to kohya's, give peft's own ΔW on every layer of our weights (SD 1.x
and SD 2.x), and draw the pixels diffusers' load_lora_weights + set_adapters draws at 0.7 (SD 1.x; no
downloads: peft, diffusers and transformers are test-only oracles)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # builds models and runs whole pipelines (diffusers' and ours)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from diffusion.lora.files import count_by_component, kohya_metadata, match, read_lora, write_kohya  # noqa: E402
from diffusion.lora.targets import pipeline_targets  # noqa: E402
from diffusion.pipeline import load_pipeline  # noqa: E402
from sd_builders import SIZE, make_sd_model  # noqa: E402

PROMPT, SEED, STEPS, GUIDANCE, SCALE = "a red circle in the top left", 3, 8, 7.5, 0.7
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "proj_in"]
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LAYOUTS = ("diffusers", "training", "peft", "kohya")


def add_adapters(pipe):
    """peft adapters with non-zero B on pipe's U-Net and text encoder: (U-Net layers, its config, text layers, its config).

    The U-Net's alpha (8) is not its rank (4) and ff.net.2 has its own alpha (2), so a reader that takes
    alpha = rank, or ignores alpha_pattern, gets other weights.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"ff.net.2": 2}, init_lora_weights=False, target_modules=UNET_MODULES)
    text_cfg = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=TEXT_MODULES)
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(text_cfg, pipe.text_encoder)  # transformers 5's add_adapter refuses peft 0.21
    return get_peft_model_state_dict(pipe.unet), unet_cfg, get_peft_model_state_dict(pipe.text_encoder), text_cfg


def build(flavour: str, root: Path) -> SimpleNamespace:
    """The base model folder, peft's ΔW of every adapted layer, and the adapter in every layout:

    diffusers   save_lora_weights of peft's state dicts, the configs in the header (what load_lora_weights reads whole)
    training    what diffusers' training scripts save: convert_state_dict_to_diffusers renames the U-Net's attention
                layers .lora.down and the text layers .lora_linear_layer while the rest stay lora_A, a mixed file
                that diffusers 0.42's own loader half drops (so it is checked against peft's ΔW, not pixels)
    peft        peft's save_pretrained: base_model.model.<path> keys, adapter_config.json beside them (the U-Net's)
    kohya       our kohya export of the layers the diffusers file matched
    """
    pipe = make_sd_model(flavour, root)
    unet_layers, unet_cfg, text_layers, text_cfg = add_adapters(pipe)
    save, to_diffusers = diffusers.StableDiffusionPipeline.save_lora_weights, diffusers.utils.convert_state_dict_to_diffusers
    metadata = dict(unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    save(root / "diffusers", unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True, **metadata)
    save(root / "training", unet_lora_layers=to_diffusers(unet_layers), text_encoder_lora_layers=to_diffusers(text_layers),
         safe_serialization=True, **metadata)
    (root / "peft").mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in unet_layers.items()}, str(root / "peft" / "adapter_model.safetensors"))
    unet_cfg.save_pretrained(str(root / "peft"))  # adapter_config.json
    files = {"diffusers": root / "diffusers" / "pytorch_lora_weights.safetensors",
             "training": root / "training" / "pytorch_lora_weights.safetensors",
             "peft": root / "peft" / "adapter_model.safetensors", "kohya": root / "kohya.safetensors"}
    matched = match(read_lora(files["diffusers"]), pipeline_targets(load_pipeline(root / "folder", device="cpu")), "diffusers file")
    write_kohya(matched, files["kohya"], kohya_metadata(4, 8.0, ("attn", "ff", "conv", "proj", "text_attn", "text_mlp"), flavour, ""))
    deltas = {}  # peft's own ΔW (alpha/rank·B·A with alpha_pattern), by component and SD name
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                sd_name = name if component == "unet" or name.startswith("text_model.") else f"text_model.{name}"
                deltas[(component, sd_name)] = module.get_delta_weight("default").detach().double()
    return SimpleNamespace(flavour=flavour, folder=root / "folder", files=files, deltas=deltas, images={})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build("sd1", tmp_path_factory.mktemp("lora_sd1"))


@pytest.fixture(scope="module")
def model_sd2(tmp_path_factory):
    return build("sd2", tmp_path_factory.mktemp("lora_sd2"))


# ---------------------------------------------------------------- ΔW: peft's, on every layer, from every layout


def expected_counts(flavour: str) -> dict[str, int]:
    # 16 attention blocks × (4 + 4 attention + 2 feed-forward + proj_in) + 22 ResBlocks × 2 convolutions; 2 text layers × 6
    return {"unet": 16 * 11 + 22 * 2, "text_encoder": 12}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_every_layout_gives_pefts_delta_on_every_layer(request, flavour, layout):
    m = request.getfixturevalue("model" if flavour == "sd1" else "model_sd2")
    ours = load_pipeline(m.folder, device="cpu")
    base = {c: {k: v.clone() for k, v in getattr(ours, c).state_dict().items()} for c in ("unet", "text_encoder")}
    lora = read_lora(m.files[layout])
    matched = match(lora, pipeline_targets(ours), layout)
    want = {k: v for k, v in m.deltas.items() if layout != "peft" or k[0] == "unet"}  # the peft file holds the U-Net's
    assert {(t.component, t.name) for t in matched} == set(want)
    assert count_by_component(matched) == {c: n for c, n in expected_counts(flavour).items() if c in {k[0] for k in want}}
    ours.set_loras([(lora, SCALE)])
    for t in matched:
        got = getattr(ours, t.component).state_dict()[t.param][t.rows[0]:t.rows[1]].double()
        delta = got - base[t.component][t.param][t.rows[0]:t.rows[1]].double()
        ref = SCALE * want[(t.component, t.name)].reshape(delta.shape)
        assert (delta - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-7, (flavour, layout, t.name)


# ---------------------------------------------------------------- pixels


def theirs(model, layout: str | None) -> np.ndarray:
    """diffusers' image as uint8 (H, W, 3), the adapter at SCALE on the U-Net and the text encoder (None: without one)."""
    if layout in model.images:
        return model.images[layout]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model.folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if layout is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # peft warns when a file's layer finds no module
            pipe.load_lora_weights(str(model.files[layout]), adapter_name="test")
        pipe.set_adapters(["test"], adapter_weights=[SCALE])  # both components: the U-Net's and the text encoder's layers
        for component, n in expected_counts(model.flavour).items():  # diffusers loaded every layer of the file
            assert sum(hasattr(mod, "lora_A") for mod in getattr(pipe, component).modules()) == n, (layout, component)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    model.images[layout] = (out * 255).round().astype(np.uint8)
    return model.images[layout]


def mine(folder: Path, lora_file: Path) -> np.ndarray:
    pipe = load_pipeline(folder, device="cpu")
    pipe.set_loras([(read_lora(lora_file), SCALE)])
    [image] = pipe.generate(PROMPT, steps=STEPS, seed=SEED, sampler="ddim", guidance=GUIDANCE, height=SIZE, width=SIZE)
    return np.asarray(image.convert("RGB"))


def check(mine_px: np.ndarray, theirs_px: np.ndarray, base: np.ndarray, what: str) -> None:
    diff = np.abs(mine_px.astype(int) - theirs_px.astype(int))
    effect = np.abs(theirs_px.astype(int) - base.astype(int))
    print(f"{what}: max diff {diff.max()} vs diffusers; the adapter moves pixels by up to {effect.max()} (mean {effect.mean():.1f})")
    assert theirs_px.std() > 10  # a real image, not a flat one that anything would match
    assert effect.max() > 20 and effect.mean() > 2, "the adapter barely changes diffusers' image: the test would prove nothing"
    assert diff.max() <= 2, (what, diff.max(), (diff > 2).mean())


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_draws_the_pixels_diffusers_draws(model, layout):
    check(mine(model.folder, model.files[layout]), theirs(model, layout), theirs(model, None), layout)


def test_sample_lora_flag_draws_the_pixels_diffusers_draws(model, tmp_path):
    file = model.files["diffusers"]
    [path] = sample.generate_files(["--model", str(model.folder), "--prompt", PROMPT, "--lora", f"{file}:{SCALE}",
                                    "--seed", str(SEED), "--steps", str(STEPS), "--guidance", str(GUIDANCE),
                                    "--height", str(SIZE), "--width", str(SIZE), "--sampler", "ddim",
                                    "--out", str(tmp_path), "--device", "cpu"])
    with Image.open(path) as im:
        got = np.asarray(im.convert("RGB"))
        assert f"<lora:{file.stem}:{SCALE:g}>" in im.info["parameters"]
    check(got, theirs(model, "diffusers"), theirs(model, None), "sample.py --lora")
