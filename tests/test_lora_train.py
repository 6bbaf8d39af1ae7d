"""Training LoRA adapters on a frozen pretrained model (configs/lora.yaml), in process on the tiny model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from diffusion.config import ConfigError, load_config
from diffusion.data import generate_shapes
from diffusion.lora.files import count_by_component, match, read_lora
from diffusion.lora.network import Adapters
from diffusion.lora.targets import pipeline_targets, select
from diffusion.pipeline import load_pipeline
from diffusion.train.run import train
from diffusion.train.signals import STOP_ENV

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "[attn,ff,conv,text_attn]"


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-data") / "shapes"
    generate_shapes(path, num=16, size=16, seed=1)
    return path


def lora_train(base: Path, data: Path, out: Path, *extra: str, resume: bool = False) -> None:
    overrides = [
        f"model.pretrained={base}", f"data.path={data}", f"output_dir={out}", "data.resolution=16",
        "lora.rank=2", "lora.alpha=4", f"lora.targets={TARGETS}", "training.max_steps=4", "training.batch_size=4",
        "training.mixed_precision=no", "training.checkpoint_every=2", "training.lr=1e-2", "training.text_encoder_lr=5e-3",
        "training.validation_prompts=[a red circle in the center]", "training.log_every=1", *extra,
    ]
    train(str(ROOT / "configs" / "lora.yaml"), overrides, resume=resume)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data_dir, tmp_path_factory) -> Path:
    before = file_hashes(tiny_model_dir)
    out = tmp_path_factory.mktemp("lora-run") / "run"
    lora_train(tiny_model_dir, data_dir, out)
    assert file_hashes(tiny_model_dir) == before  # the base is never written
    return out


def test_lora_training_writes_only_adapters_in_kohya_layout(trained, tiny_model_dir):
    lora = read_lora(trained / "lora.safetensors")
    assert lora.layout == "kohya" and all(k.startswith(("lora_unet_", "lora_te_")) for k in lora.layers)
    base = load_pipeline(tiny_model_dir, device="cpu")
    wanted = select(pipeline_targets(base), ("attn", "ff", "conv", "text_attn"))
    matched = match(lora, pipeline_targets(base), "trained adapter")
    assert set(matched) == set(wanted)  # every targeted layer, in both components, nothing else
    assert set(count_by_component(matched)) == {"unet", "text_encoder"}
    assert {layer.alpha for layer in lora.layers.values()} == {4.0} and {layer.rank for layer in lora.layers.values()} == {2}
    assert any(layer.up.abs().sum() > 0 for layer in lora.layers.values())  # B left zero would mean no training
    meta = lora.metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4.0" and meta["ss_sd_model_hash"] == base.model_hash
    assert "text_attn" in meta["ss_network_args"]
    # A checkpoint holds the adapter and the training state, never the base model.
    step = trained / "checkpoints" / "step-000004"
    assert sorted(p.name for p in step.iterdir()) == ["lora.safetensors", "lora_train.safetensors", "meta.json", "state.pt"]
    assert not (trained / "model").exists()
    assert (trained / "lora.safetensors").stat().st_mode & 0o777 == 0o644


def test_only_adapter_weights_get_optimizer_state(trained, tiny_model_dir):
    state = torch.load(trained / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    base = load_pipeline(tiny_model_dir, device="cpu")
    targets = select(pipeline_targets(base), ("attn", "ff", "conv", "text_attn"))
    adapter_params = 2 * len(targets)  # one A and one B per layer
    moments = state["optimizers"][0]["state"]
    assert 0 < len(moments) <= adapter_params  # the last text block's adapters are unused under layer=penultimate
    assert all(m["exp_avg"].numel() < 10_000 for m in moments.values())  # low-rank factors, not base weights


def test_lora_resume_is_bit_exact(trained, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "lora:2")
    lora_train(tiny_model_dir, data_dir, out)
    assert not (out / "lora.safetensors").exists()
    monkeypatch.delenv(STOP_ENV)
    lora_train(tiny_model_dir, data_dir, out, resume=True)
    for name in ("lora.safetensors", "checkpoints/step-000004/lora_train.safetensors"):
        a, b = read_lora(trained / name), read_lora(out / name)
        assert a.layers.keys() == b.layers.keys()
        for k in a.layers:
            assert torch.equal(a.layers[k].down, b.layers[k].down) and torch.equal(a.layers[k].up, b.layers[k].up)


def test_a_second_run_refuses_to_overwrite_the_adapter(trained, tiny_model_dir, data_dir):
    from diffusion.errors import TrainError

    with pytest.raises(TrainError, match="already holds a training run"):
        lora_train(tiny_model_dir, data_dir, trained)


def test_parametrized_weights_equal_the_merged_adapter(tiny_model_dir, trained):
    """Training's W + (alpha/r)·B·A and generation's merged weights are the same function."""
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    lora = read_lora(trained / "lora.safetensors")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 16, 64)
    pipe.set_loras([(lora, 1.0)])
    merged = pipe.unet(x, t, ctx)
    pipe.set_loras([])
    targets = select(pipeline_targets(pipe), ("attn", "ff", "conv", "text_attn"))
    adapters = Adapters(pipe, targets, rank=2, alpha=4.0)
    adapters.load_layers(match(lora, targets, "adapter"), "adapter")
    torch.testing.assert_close(pipe.unet(x, t, ctx), merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=4"], "set model.pretrained"),
    (["lora.rank=4", "model.pretrained=x", "text_encoder.trainable=false", "lora.targets=[attn,bogus]"], "unknown entry 'bogus'"),
    (["lora.rank=4", "model.pretrained=x", "text_encoder.trainable=true"], "leave text_encoder.trainable false"),
    (["lora.rank=-1"], "lora.rank must be >= 0"),
])
def test_bad_lora_configs_get_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def test_regularization_images_join_the_training_index(tmp_path):
    from diffusion.config import DataConfig
    from diffusion.data import index_folder
    from diffusion.train.run import add_regularization

    generate_shapes(tmp_path / "new", num=6, size=16, seed=0, colors=["cyan"])
    generate_shapes(tmp_path / "old", num=10, size=16, seed=1)
    data = DataConfig(path=str(tmp_path / "new"), reg_path=str(tmp_path / "old"), reg_num=4)
    index = index_folder(data.path, data)
    add_regularization(index, data)
    assert len(index) == 10 and sum("cyan" in caps[0] for _, caps in index.items) == 6
    assert "regularization: 4 pairs" in index.report()


def test_a_missing_regularization_folder_is_named(tmp_path):
    from diffusion.config import DataConfig
    from diffusion.data import DataError, index_folder
    from diffusion.train.run import add_regularization

    generate_shapes(tmp_path / "new", num=2, size=16, seed=0)
    data = DataConfig(path=str(tmp_path / "new"), reg_path=str(tmp_path / "absent"))
    with pytest.raises(DataError, match="^data.reg_path: data path not found"):
        add_regularization(index_folder(data.path, data), data)
