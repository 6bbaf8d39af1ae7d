"""Setting up a training run: the output folder's policy, the saved config, Accelerate, the data, then the stages."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin

from ..config import Config, load_config, load_yaml, save_config, to_dict
from ..data import DataError, ensure_shapes, index_folder
from ..data.shards import is_shards, list_shards
from ..devices import Choice, compiler_missing, quiet_compiler, resolve_channels_last, resolve_compile, resolve_mixed_precision
from ..errors import TrainError, warn
from ..pipeline import default_device
from .loop import Run, run_loop
from .metrics import MetricsLogger
from .signals import StopRequest


def train(config: str, overrides: list[str], stage: str = "all", resume: bool = False, overwrite: bool = False) -> None:
    """Run the stages that `stage` asks for ("vae", "ldm" or "all") under the config file plus overrides."""
    from .ldm_stage import LDMStage
    from .lora_stage import LoRAStage
    from .vae_stage import VAEStage

    stage_classes = {"vae": VAEStage, "ldm": LDMStage, "lora": LoRAStage}

    cfg = load_config(config, overrides)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
    stages = stages_to_run(stage, cfg, out, resume)
    prepare_output_dir(out, stages, accelerator, resume, overwrite)
    if accelerator.is_main_process:
        save_run_config(cfg, out)
        if stage != "ldm" and "vae" not in stages:
            vae = cfg.model.pretrained or cfg.vae_training.pretrained or f"{out / 'vae'} (finished)"
            print(f"skipping the VAE stage: using {vae}", file=sys.stderr)
    index = load_data(cfg, accelerator)
    logger = MetricsLogger(out / "metrics.jsonl", accelerator, trackers=bool(accelerator.trackers))
    layout = resolve_channels_last(cfg.training.channels_last, accelerator.device, accelerator.mixed_precision)
    run = Run(cfg, out, accelerator, index, resume, logger, StopRequest(), channels_last=layout.value == "yes")
    for name in stages:
        if not run_loop(run, stage_classes[name](run)):
            break
    accelerator.end_training()


def report_modes(cfg: Config, precision: Choice, compiled: Choice) -> None:
    """One line for each `auto` choice, and one for what compilation changes."""
    if cfg.training.mixed_precision == "auto":
        print(f"training.mixed_precision auto: {precision.value} ({precision.reason})", file=sys.stderr)
    if cfg.training.compile == "auto":
        print(f"training.compile auto: {compiled.value} ({compiled.reason})", file=sys.stderr)
    if compiled.value == "yes":
        print(
            "training.compile: the first steps of each stage compile the models (a minute or more); compiled kernels round "
            "differently from eager ones, so --resume is bit-exact only when both runs compile",
            file=sys.stderr,
        )


def stages_to_run(stage: str, cfg: Config, out: Path, resume: bool) -> list[str]:
    vae_done = resume and (out / "vae" / "vae.yaml").is_file()
    vae = stage in ("vae", "all") and not (cfg.vae_training.pretrained or cfg.model.pretrained) and not vae_done
    second = "lora" if cfg.lora.rank else "ldm"  # adapters on a frozen model, or the model itself
    return (["vae"] if vae else []) + ([second] if stage in ("ldm", "all") else [])


def stage_outputs(out: Path, stage: str) -> list[Path]:
    """What a stage writes; a folder holding any of it holds a run of that stage."""
    if stage == "vae":
        return [out / "vae"]
    return [out / "checkpoints", out / ("lora.safetensors" if stage == "lora" else "model"), out / "samples"]


def prepare_output_dir(out: Path, stages: list[str], accelerator: Accelerator, resume: bool, overwrite: bool) -> None:
    """Refuse to overwrite a previous run unless resume or overwrite; with overwrite, clear it."""
    held = [p for s in stages for p in stage_outputs(out, s) if p.is_file() or p.is_dir() and any(p.iterdir())]
    if held and not (resume or overwrite):
        raise TrainError(
            f"{out} already holds a training run ({held[0].name}/); pass --resume to continue it or --overwrite to start over"
        )
    accelerator.wait_for_everyone()  # every rank has looked before anything is deleted
    if overwrite and accelerator.is_main_process:
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for stage in stages:
            MetricsLogger(out / "metrics.jsonl", accelerator).truncate(stage, after_step=-1)
    accelerator.wait_for_everyone()


def save_run_config(cfg: Config, out: Path) -> None:
    """Write config.yaml; when resuming under a changed config, say which keys changed."""
    path = out / "config.yaml"
    if path.is_file():
        old, new = _flatten(load_yaml(path)), _flatten(to_dict(cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            warn(f"the config differs from the one saved in {path}: {', '.join(changed[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return flat


def load_data(cfg: Config, accelerator: Accelerator):
    """Index the data folder on every rank (deterministic, no collective), generating shapes data first if asked.

    Shards (data.path a folder of .tar files or a brace pattern) are listed and counted, not indexed.
    """
    if is_shards(cfg.data.path):
        if cfg.data.reg_path or cfg.data.buckets:
            raise DataError("data.reg_path and data.buckets need an image-caption folder as data.path, not shards")
        index = list_shards(cfg.data.path)
        if accelerator.is_main_process:
            print(index.report(), file=sys.stderr)
        return index
    # One process per machine generates (the same bytes everywhere); the others wait, then find it there.
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process and ensure_shapes(cfg.data):
            print(f"generated {cfg.data.shapes.num} shapes images in {cfg.data.path}", file=sys.stderr)
    index = index_folder(cfg.data.path, cfg.data, progress=accelerator.is_main_process)
    if cfg.data.reg_path:
        add_regularization(index, cfg.data)
    if accelerator.is_main_process:
        print(index.report(), file=sys.stderr)
    return index


def add_regularization(index, data) -> None:
    """Append data.reg_num pairs of data.reg_path (all for 0) to the training index."""
    if data.reg_num < 0:
        raise TrainError(f"data.reg_num must be >= 0 (0: all of data.reg_path), got {data.reg_num}")
    try:
        reg = index_folder(data.reg_path, data)
    except DataError as e:
        raise DataError(f"data.reg_path: {e}") from None
    pairs = reg.items[: data.reg_num or None]
    index.items.extend(pairs)
    index.info.update(reg.info)
    index.notes.append(f"regularization: {len(pairs)} pairs from {data.reg_path} (data.reg_path)")


def make_accelerator(cfg: Config, out: Path) -> Accelerator:
    device = default_device()
    precision = resolve_mixed_precision(cfg.training.mixed_precision, device)
    compiled = resolve_compile(cfg.training.compile, device)
    if compiled.value == "yes" and (problem := compiler_missing(device)):
        raise TrainError(f"training.compile: {problem}, or set training.compile=no")
    use_tb = cfg.training.tensorboard
    if use_tb:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            warn("training.tensorboard is set but tensorboard is not installed; metrics.jsonl only")
            use_tb = False
    try:
        accelerator = Accelerator(
            mixed_precision=precision.value,
            cpu=device.type == "cpu",  # makes torchrun on CPUs use gloo data parallelism
            log_with="tensorboard" if use_tb else None,
            project_dir=str(out),
            # Static shapes: a batch of another size gets its own graph rather than one general graph,
            # whose kernels would then depend on which sizes came first.
            dynamo_plugin=TorchDynamoPlugin(backend="inductor" if compiled.value == "yes" else "no", dynamic=False),
        )
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"cannot set up Accelerate: {e}") from None
    if compiled.value == "yes":
        quiet_compiler()
    if accelerator.is_main_process:
        report_modes(cfg, precision, compiled)
    if use_tb:
        accelerator.init_trackers("tensorboard")
    return accelerator
