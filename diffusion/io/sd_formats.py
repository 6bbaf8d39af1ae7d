"""Stable Diffusion models as the field stores them: diffusers folders and single-file checkpoints.

    read_model(path) -> (PipelineConfig, {"unet": ..., "vae": ..., "text_encoder": ...} native state dicts)

A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`)
brings its configs; a single file (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`) brings only tensors, so its architecture is read from their shapes and each
family's rule (SD 1.x: 8 heads per level; SD 2.x: heads of 64 channels and linear projections), unless
its metadata holds our pipeline config (the files diffusion.io.sd_export writes), which rebuilds any
architecture exactly.
Pickled weights (.ckpt, .bin, .pt) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, PipelineConfig, SamplingConfig, ScheduleConfig, from_dict
from ..errors import warn
from ..registry import SAMPLERS, from_diffusers
from .sd_text import diffusers_text, native_from_sd, single_file_text
from .sd_unet import SD_NORM_EPS, Family, unet_config_from_compvis, unet_config_from_diffusers, unet_from_compvis, unet_from_diffusers
from .sd_vae import vae_config_from_compvis, vae_config_from_diffusers, vae_from_compvis, vae_from_diffusers
from .weights import WeightsError, load_weights_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD_SCALE_FACTOR = 0.18215  # SD 1.x and 2.x VAEs
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# A single file's metadata keys: the prediction type and zero terminal SNR (read from any file), and our
# whole PipelineConfig as JSON (in the files we write).
PREDICTION_KEY, ZERO_SNR_KEY, CONFIG_KEY = "prediction_type", "zero_terminal_snr", "pipeline_config"


@dataclass
class ScheduleInfo:
    """What a scheduler_config.json (or the single file's flags) says about training and sampling."""

    schedule: ScheduleConfig
    sampling: SamplingConfig


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path} is a pickle ({path.suffix}), which can run code when loaded; convert it to .safetensors first "
            "(e.g. with safetensors.torch.save_file on a trusted machine), then load that"
        )


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def read_model(path: str | Path, prediction_type: Optional[str] = None, ema: str = "auto") -> tuple[PipelineConfig, dict]:
    """(config, native state dicts) of a diffusers folder or an SD single file."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers_folder(path, prediction_type)
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path} is not a model: give our model folder, a diffusers folder or an SD .safetensors file")
    return read_single_file(path, prediction_type, ema)


# ----------------------------------------------------------------------------- diffusers folders


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {type(e).__name__}") from None


def _safetensors(folder: Path, stem: str) -> Path:
    """folder/stem.safetensors; a folder holding only pickled weights is refused."""
    path = folder / f"{stem}.safetensors"
    if path.is_file():
        return path
    for pickled in sorted(folder.glob("*.bin")):
        refuse_pickle(pickled)
    raise WeightsError(f"{folder} holds no {path.name}")


def _unet_family(unet_json: dict) -> Family:
    """How the U-Net's widths split into heads. diffusers' `attention_head_dim` counts heads per level
    (a historical misnomer): 8 for SD 1.x, [5, 10, 20, 20] for SD 2.x, i.e. 64-channel heads."""
    heads = unet_json.get("attention_head_dim", 8)
    widths = unet_json["block_out_channels"]
    groups = unet_json.get("norm_num_groups", 32)
    if isinstance(heads, int):
        return Family(num_heads=heads, norm_groups=groups)
    head_dims = {w // h for w, h in zip(widths, heads)}
    if len(head_dims) != 1:
        raise WeightsError(f"unet/config.json: attention_head_dim {heads} gives unequal head widths for {widths}")
    return Family(head_dim=head_dims.pop(), norm_groups=groups)


def read_diffusers_folder(root: Path, prediction_type: Optional[str] = None) -> tuple[PipelineConfig, dict]:
    missing = [name for name in FOLDERS if not (root / name).is_dir()]
    if missing:
        raise WeightsError(f"{root} is a diffusers folder without {', '.join(f'{m}/' for m in missing)}")
    unet_json, vae_json = _json(root / "unet" / "config.json"), _json(root / "vae" / "config.json")
    unet_sd = load_weights_file(_safetensors(root / "unet", "diffusion_pytorch_model"))
    unet_cfg = unet_config_from_diffusers(unet_sd, _unet_family(unet_json))
    unet_cfg = replace(unet_cfg, norm_eps=unet_json.get("norm_eps", SD_NORM_EPS))
    vae_sd = load_weights_file(_safetensors(root / "vae", "diffusion_pytorch_model"))
    vae_cfg = replace(vae_config_from_diffusers(vae_sd, vae_json.get("norm_num_groups", 32)),
                      scale_factor=vae_json.get("scaling_factor", SD_SCALE_FACTOR))
    _safetensors(root / "text_encoder", "model")
    text_cfg, text_sd = diffusers_text(root)
    info = read_scheduler(root / "scheduler" / "scheduler_config.json", prediction_type)
    resolution = unet_json.get("sample_size", 64) * vae_cfg.factor
    cfg = PipelineConfig(vae=vae_cfg, text_encoder=text_cfg, unet=unet_cfg, schedule=info.schedule, sampling=info.sampling)
    cfg = replace(cfg, info=replace(cfg.info, name=root.name, resolution=resolution))
    return cfg, {"unet": unet_from_diffusers(unet_sd, unet_cfg), "vae": vae_from_diffusers(vae_sd, vae_cfg), "text_encoder": text_sd}


def read_scheduler(path: Path, prediction_type: Optional[str] = None) -> ScheduleInfo:
    """The training schedule and the sampling defaults of a scheduler_config.json."""
    s = _json(path)
    beta_schedule = BETA_SCHEDULES.get(s.get("beta_schedule", "scaled_linear"))
    if beta_schedule is None:
        raise WeightsError(f"{path}: beta_schedule {s['beta_schedule']!r} is not one of {sorted(BETA_SCHEDULES)}")
    stored = s.get("prediction_type", "epsilon")
    if prediction_type and stored != prediction_type:
        raise _contradiction(path, stored, prediction_type)
    if stored not in ("epsilon", "v_prediction"):
        raise WeightsError(f"{path}: prediction_type {stored!r} is not epsilon or v_prediction")
    schedule = ScheduleConfig(
        num_train_timesteps=s.get("num_train_timesteps", 1000), beta_schedule=beta_schedule,
        beta_start=s.get("beta_start", 0.00085), beta_end=s.get("beta_end", 0.012),
        zero_terminal_snr=bool(s.get("rescale_betas_zero_snr", False)), prediction_type=stored,
    )
    name = s.get("_class_name", "DDIMScheduler")
    spec = from_diffusers(name, s)
    if spec is None:
        known = any(s.diffusers and s.diffusers[0] == name for s in SAMPLERS)
        warn(f"{path.parent}: {name}{' with these settings' if known else ''} has no sampler here; sampling with DDIM on its schedule")
    sampler = spec.key if spec else "ddim"
    sampling = SamplingConfig(
        sampler=sampler, timestep_spacing=s.get("timestep_spacing", "leading"), steps_offset=s.get("steps_offset", 0),
        final_alpha_one=bool(s.get("set_alpha_to_one", False)),
    )
    return ScheduleInfo(schedule, sampling)


# ----------------------------------------------------------------------------- single files


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _choose_ema(state: dict[str, torch.Tensor], ema: str, path: Path) -> dict[str, torch.Tensor]:
    """The U-Net tensors to use: the EMA copy (`model_ema.*`, with the dots of each name removed) or the raw ones.

    "auto" takes the EMA copy when the file has one, as the original SD code does for inference.
    """
    unet = _under(state, UNET_PREFIX)
    ema_keys = {k[len("model_ema."):]: v for k, v in state.items()
                if k.startswith("model_ema.") and k not in ("model_ema.num_updates", "model_ema.decay")}
    if ema == "off" or (ema == "auto" and not ema_keys):
        return unet
    if not ema_keys:
        raise WeightsError(f"{path} holds no EMA weights (model_ema.*); use --ema off or auto")
    by_flat = {f"diffusion_model{k}".replace(".", ""): k for k in unet}
    try:
        return {by_flat[k]: v for k, v in ema_keys.items()}
    except KeyError as e:
        raise WeightsError(f"{path}: EMA tensor model_ema.{e.args[0]} matches no U-Net tensor") from None


def read_single_file(path: Path, prediction_type: Optional[str] = None, ema: str = "auto") -> tuple[PipelineConfig, dict]:
    state = load_weights_file(path)
    found = sorted({k.split(".")[0] for k in state})
    if not any(k.startswith(UNET_PREFIX) for k in state) or not any(k.startswith(VAE_PREFIX) for k in state):
        raise WeightsError(f"{path} matches no Stable Diffusion layout (top-level keys: {', '.join(found[:8])}); "
                           "expected model.diffusion_model.*, first_stage_model.* and cond_stage_model.*")
    unet_sd, vae_sd = _choose_ema(state, ema, path), _under(state, VAE_PREFIX)
    stored = file_metadata(path).get(CONFIG_KEY)
    if stored is not None:
        cfg, text_sd = stored_config(path, stored, prediction_type), native_from_sd(state)
    else:
        cfg, text_sd = _inferred_config(path, state, unet_sd, vae_sd, prediction_type)
    return cfg, {"unet": unet_from_compvis(unet_sd, cfg.unet), "vae": vae_from_compvis(vae_sd, cfg.vae), "text_encoder": text_sd}


def file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def stored_config(path: Path, text: str, prediction_type: Optional[str]) -> PipelineConfig:
    """The PipelineConfig a single file's metadata holds; a --prediction-type that contradicts it is refused."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        cfg = from_dict(PipelineConfig, data)
    except (ValueError, ConfigError) as e:
        raise WeightsError(f"{path}: its {CONFIG_KEY} metadata is not a pipeline config ({e})") from None
    if prediction_type and prediction_type != cfg.schedule.prediction_type:
        raise _contradiction(path, cfg.schedule.prediction_type, prediction_type)
    return cfg


def _contradiction(path: Path, stored: str, asked: str) -> WeightsError:
    return WeightsError(f"{path} says prediction_type {stored!r}, but {asked!r} was asked for; drop the flag or fix the file")


def _inferred_config(path: Path, state: dict[str, torch.Tensor], unet_sd: dict[str, torch.Tensor],
                     vae_sd: dict[str, torch.Tensor], prediction_type: Optional[str]) -> tuple[PipelineConfig, dict]:
    """(config, native text weights) of an SD file that brings no config: its shapes and SD's rules tell it."""
    text_cfg, text_sd = single_file_text(state)
    sd2 = text_cfg.layer == "penultimate"
    unet_cfg = replace(unet_config_from_compvis(unet_sd, "sd2" if sd2 else "sd1"), norm_eps=SD_NORM_EPS)
    vae_cfg = replace(vae_config_from_compvis(vae_sd), scale_factor=SD_SCALE_FACTOR)
    info = single_file_schedule(path, prediction_type)
    cfg = PipelineConfig(vae=vae_cfg, text_encoder=text_cfg, unet=unet_cfg, schedule=info.schedule, sampling=info.sampling)
    resolution = 768 if info.schedule.prediction_type == "v_prediction" else 512
    return replace(cfg, info=replace(cfg.info, name=path.stem, resolution=resolution)), text_sd


def single_file_schedule(path: Path, prediction_type: Optional[str]) -> ScheduleInfo:
    """SD's training schedule; the prediction type from the flag, else the file's metadata, else a sidecar
    `<stem>.yaml` (the original configs' `parameterization`), else epsilon. Never from the file name.
    Zero terminal SNR only when the metadata says so."""
    metadata = file_metadata(path)
    stored = metadata.get(PREDICTION_KEY)
    sidecar = path.with_suffix(".yaml")
    if stored is None and sidecar.is_file():
        stored = _sidecar_prediction_type(sidecar)
    if prediction_type and stored and prediction_type != stored:
        raise _contradiction(path, stored, prediction_type)
    chosen = prediction_type or stored or "epsilon"
    schedule = ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=chosen,
                              zero_terminal_snr=metadata.get(ZERO_SNR_KEY, "false").lower() == "true")
    return ScheduleInfo(schedule, SamplingConfig(sampler="ddim", timestep_spacing="leading", steps_offset=1))


def _sidecar_prediction_type(path: Path) -> str:
    """The original LDM config's model.params.parameterization: "v" is v-prediction, "eps" (the default) ε."""
    import yaml

    try:
        params = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("params", {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise WeightsError(f"cannot read {path}: {type(e).__name__}") from None
    return "v_prediction" if params.get("parameterization", "eps") == "v" else "epsilon"
