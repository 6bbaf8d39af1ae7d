"""One sampler interface: the registry's names reach the config, the pipeline, sample.py, the app, the PNG
infotext and the diffusers scheduler config alike."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from diffusion import registry  # noqa: E402
from diffusion.config import ConfigError, SamplingConfig, ScheduleConfig, load_config  # noqa: E402
from diffusion.errors import UsageError  # noqa: E402
from diffusion.infotext import GenerationParams  # noqa: E402
from diffusion.io.sd_export import scheduler_config  # noqa: E402

WEB_UI_NAMES = ["DDIM", "DDPM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras"]


def test_the_web_ui_names_and_short_forms_name_one_sampler_each():
    assert [s.name for s in registry.SAMPLERS] == WEB_UI_NAMES
    for spec in registry.SAMPLERS:
        assert registry.sampler(spec.name) is registry.sampler(spec.key) is registry.sampler(spec.name.upper()) is spec
    assert registry.sampler("euler_a").name == "Euler a" and registry.sampler("dpmpp_2m").name == "DPM++ 2M"


def test_every_sampler_has_the_one_signature():
    for spec in registry.SAMPLERS:
        params = inspect.signature(spec.fn).parameters
        assert list(params)[:4] == ["model", "x", "alphas_cumprod", "timesteps"], spec.name
        assert {"generators", "callback"} <= set(params) and set(spec.options) <= set(params), spec.name


def test_an_unknown_name_lists_the_valid_ones(capsys):
    with pytest.raises(UsageError) as e:
        registry.sampler("DPM++ 3M")
    assert all(f'"{n}"' in str(e.value) for n in WEB_UI_NAMES) and "dpmpp_2m_karras" in str(e.value)
    assert sample.main(["--model", "m", "--prompt", "x", "--sampler", "DPM++ 3M"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown sampler 'DPM++ 3M'" in err
    with pytest.raises(ConfigError, match="sampling.sampler: unknown sampler 'heun'"):
        load_config(None, ["sampling.sampler=heun"])


@pytest.mark.parametrize("name", WEB_UI_NAMES)
def test_infotext_writes_and_reads_the_web_ui_name(name):
    params = GenerationParams(prompt="a cat", sampler=registry.sampler(name).key, steps=20)
    text = params.to_infotext()
    assert f"Sampler: {name}," in text
    assert GenerationParams.from_infotext(text).sampler == registry.sampler(name).key


def test_infotext_reads_the_newer_schedule_type_field():
    text = "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    assert GenerationParams.from_infotext(text).sampler == "dpmpp_2m_karras"
    with pytest.raises(ValueError, match="'Sampler: Heun' in the PNG's parameters is not a sampler here"):
        GenerationParams.from_infotext("a cat\nSteps: 20, Sampler: Heun, CFG scale: 7, Seed: 1, Size: 512x512")


@pytest.mark.parametrize("name", WEB_UI_NAMES)
def test_each_sampler_exports_as_the_diffusers_scheduler_that_reads_back_as_it(name):
    spec = registry.sampler(name)
    config = scheduler_config(ScheduleConfig(), SamplingConfig(sampler=spec.key))
    assert config["_class_name"] == spec.diffusers[0]
    assert registry.from_diffusers(config["_class_name"], config) is spec


def test_sample_accepts_short_forms_and_records_the_web_ui_name(tiny_model_dir, tmp_path):
    from diffusion.infotext import read_png_params

    for form in ("dpmpp_2m_sde_karras", "Euler a"):
        [path] = sample.generate_files(["--model", str(tiny_model_dir), "--prompt", "x", "--steps", "3",
                                        "--sampler", form, "--out", str(tmp_path / form)])
        assert read_png_params(path).sampler == registry.sampler(form).key


def test_zero_terminal_snr_with_an_epsilon_model_is_warned_once(capsys):
    import dataclasses

    from diffusion.pipeline import Pipeline

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    Pipeline(dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, zero_terminal_snr=True)).pipeline_config())
    assert capsys.readouterr().err.count("zero terminal SNR with an ε-prediction model") == 1
    v = dataclasses.replace(cfg.schedule, zero_terminal_snr=True, prediction_type="v_prediction")
    Pipeline(dataclasses.replace(cfg, schedule=v).pipeline_config())
    assert "zero terminal SNR" not in capsys.readouterr().err
