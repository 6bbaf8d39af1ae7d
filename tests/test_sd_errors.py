"""Loading Stable Diffusion files: each problem is one line that names the file, the key or the choice,
and the EMA and prediction-type pitfalls are settled by rule, not by guessing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from diffusion.io.sd_formats import _choose_ema, read_scheduler, single_file_schedule  # noqa: E402
from diffusion.io.weights import WeightsError, load_weights_file  # noqa: E402
from diffusion.pipeline import PipelineError, load_pipeline  # noqa: E402


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_pickle_is_refused_with_the_way_out(tmp_path, capsys):
    ckpt = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(PipelineError) as e:
        load_pipeline(ckpt)
    assert str(ckpt) in one_line(e) and "pickle" in str(e.value) and ".safetensors" in str(e.value)
    assert sample.main(["--model", str(ckpt), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "pickle" in err


def test_a_file_that_is_not_a_model_is_one_line(tmp_path, capsys):
    config = tmp_path / "sd15.yaml"
    config.write_text("name: sd15\n")
    assert sample.main(["--model", str(config), "--prompt", "x"]) == 1
    assert capsys.readouterr().err == f"error: {config} is not a model: give our model folder, a diffusers folder or an SD .safetensors file\n"
    garbage = tmp_path / "weights.pt"
    garbage.write_text("not a pickle")
    with pytest.raises(WeightsError) as e:
        load_weights_file(garbage)
    assert one_line(e).startswith(f"cannot read weights file {garbage}")


def test_a_diffusers_folder_without_a_component_names_it(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    for name in ("vae", "text_encoder", "scheduler"):
        (tmp_path / name).mkdir()
    with pytest.raises(PipelineError) as e:
        load_pipeline(tmp_path)
    assert one_line(e).endswith("without unet/, tokenizer/")


def test_a_single_file_of_another_kind_lists_what_it_holds(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2), "text_proj.weight": torch.zeros(2)}, str(path))
    with pytest.raises(PipelineError) as e:
        load_pipeline(path)
    message = one_line(e)
    assert "matches no Stable Diffusion layout" in message and "lora_unet_down" in message and "model.diffusion_model" in message


def test_ema_weights_are_chosen_by_the_flag_and_never_silently(tmp_path):
    raw, ema = torch.zeros(3), torch.ones(3)
    state = {"model.diffusion_model.input_blocks.0.0.weight": raw, "model_ema.diffusion_modelinput_blocks00weight": ema,
             "model_ema.num_updates": torch.tensor(7), "model_ema.decay": torch.tensor(0.9999)}
    path = tmp_path / "m.safetensors"
    assert torch.equal(_choose_ema(state, "auto", path)["input_blocks.0.0.weight"], ema)  # present: EMA, as SD's own code samples
    assert torch.equal(_choose_ema(state, "on", path)["input_blocks.0.0.weight"], ema)
    assert torch.equal(_choose_ema(state, "off", path)["input_blocks.0.0.weight"], raw)
    plain = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    assert torch.equal(_choose_ema(plain, "auto", path)["input_blocks.0.0.weight"], raw)
    with pytest.raises(WeightsError, match="holds no EMA weights"):
        _choose_ema(plain, "on", path)


def test_prediction_type_comes_from_flag_then_metadata_then_sidecar_then_default(tmp_path):
    bare, tagged = tmp_path / "model-v.safetensors", tmp_path / "tagged.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    save_file({"x": torch.zeros(1)}, str(tagged), metadata={"prediction_type": "v_prediction"})
    assert single_file_schedule(bare, None).schedule.prediction_type == "epsilon"  # never from the name
    assert single_file_schedule(bare, "v_prediction").schedule.prediction_type == "v_prediction"
    assert single_file_schedule(tagged, None).schedule.prediction_type == "v_prediction"
    with pytest.raises(WeightsError, match="says prediction_type 'v_prediction', but 'epsilon' was asked for"):
        single_file_schedule(tagged, "epsilon")
    bare.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert single_file_schedule(bare, None).schedule.prediction_type == "v_prediction"


def test_scheduler_config_sets_the_schedule_and_refuses_a_contradiction(tmp_path, capsys):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False, "prediction_type": "epsilon"}))
    info = read_scheduler(path)
    assert info.sampling.sampler == "ddim" and info.sampling.steps_offset == 1 and not info.sampling.final_alpha_one
    assert "PNDMScheduler has no sampler here; sampling with DDIM" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="says prediction_type 'epsilon', but 'v_prediction' was asked for"):
        read_scheduler(path, "v_prediction")


def test_fp16_attention_does_not_overflow_where_q_k_exceeds_fp16():
    from diffusion.models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(64, heads=1)
    x = torch.randn(1, 16, 64) * 400
    with torch.no_grad():
        q, k, _ = attn.to_qkv(x).chunk(3, dim=-1)
        assert (q @ k.transpose(-1, -2) / 64**0.5).abs().max() > 65504  # the scaled logits exceed fp16's range
        reference = attn(x)
        half = attn.half()(x.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_non_finite_generation_stops_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from diffusion.models.unet import UNet

    monkeypatch.setattr(UNet, "forward", lambda self, x, t, context: torch.full_like(x, float("nan")))
    out = tmp_path / "out"
    assert sample.main(["--model", str(tiny_model_dir), "--prompt", "x", "--steps", "2", "--out", str(out)]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last == "error: generation produced non-finite values at seed 0 (float32); the model's weights may be damaged"
    assert not out.exists() or not any(out.iterdir())
