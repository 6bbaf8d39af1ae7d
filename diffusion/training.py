"""Helpers for train.py: optimisation, EMA, checkpoints, data order, caches, VAE losses, logging, stopping.

train.py reads top to bottom and keeps the two training loops; everything here is a short piece
those loops call. Nothing in this module decides *what* to train.

Checkpoint layout (one folder per saved step, written under a temporary name and renamed):

    checkpoints/step-000500/
      meta.json                 step and the size of every file; written last, checked on load
      state.pt                  optimizer, LR scheduler, step, data position, every rank's RNG states
      *.safetensors             the weights (see train.py for each stage's files)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .cli import warn
from .weights import WeightsError, load_weights_file, save_weights

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
DEBUG_ENV = "DIFFUSION_DEBUG_DIR"  # tests: each rank appends the sample indices it reads to <dir>/rank<r>.jsonl
STOP_ENV = "DIFFUSION_STOP_AT"  # tests: "<stage>:<step>" acts like SIGTERM after that step


class TrainError(RuntimeError):
    """A training run that cannot go on; the message is one line for the CLI."""


# ----------------------------------------------------------------------------- optimisation


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str = "constant") -> Callable[[int], float]:
    """LR multiplier for optimizer step s (0-based): linear warmup to 1, then constant or cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EMA:
    """Exponential moving average of a module's weights, decay min(decay, (1 + s)/(10 + s)) with warmup.

    The warmup (as in diffusers' EMAModel) lets early, poor weights fade out quickly. Buffers are copied.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1.0 - d)  # shadow = d·shadow + (1 − d)·v
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise WeightsError(f"EMA weights do not match the model: {sorted(missing)[:3]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """Use the EMA weights inside the block, and the training weights again after it."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(backup)


def state_hash(module_or_state: nn.Module | dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: equal hashes, equal weights."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        # flatten first: a size-1 last dim may carry any stride, which view(uint8) refuses
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- random state


def rng_state(generator: torch.Generator) -> dict:
    """Every random state that training draws from: python, numpy, torch (CPU and CUDA) and our generator."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses; store a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def make_generator(accelerator, seed: int, stream: int) -> torch.Generator:
    """This rank's generator for noise, timesteps and caption dropout: independent per (seed, rank, stream)."""
    device = accelerator.device if accelerator.device.type != "cpu" else "cpu"
    state = np.random.SeedSequence([seed, accelerator.process_index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) >> 1)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint name under root, oldest first; temporaries are ignored."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


@contextlib.contextmanager
def write_checkpoint(root: Path, step: int, keep: int):
    """Yield a temporary folder to fill; on success record meta.json and rename it to step-XXXXXX.

    The rename is the commit: a kill at any point before it leaves the previous checkpoints as they
    were, and only a `step-XXXXXX.tmp` folder that the next save removes. Then only the newest `keep`
    checkpoints are kept.
    """
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob("step-*"):  # temporaries of saves that were killed
        if not CHECKPOINT_RE.match(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "meta.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():  # the same step saved again (e.g. a resumed run that replaces a corrupt one)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({file stem: state dict} for every .safetensors file, state.pt) of one checkpoint folder.

    Raises TrainError when anything is missing, truncated or unreadable.
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, size in meta["files"].items():
            actual = (path / name).stat().st_size
            if actual != size:
                raise TrainError(f"{name} has {actual} bytes, expected {size} (truncated?)")
        weights = {p.stem: load_weights_file(p) for p in sorted(path.glob("*.safetensors"))}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, WeightsError) as e:
        raise TrainError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return weights, state


def latest_checkpoint(root: Path, say: Callable[[str], None] = warn) -> Optional[tuple[Path, dict, dict]]:
    """(folder, weights, state) of the newest checkpoint that loads; broken ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            return (path, *load_checkpoint(path))
        except TrainError as e:
            say(f"skipping checkpoint {path}: {e}; trying the previous one")
    return None


def save_training_state(path: Path, step: int, position: tuple[int, int], accelerator, optimizers, scheduler, rng: list[dict]) -> None:
    scaler = getattr(accelerator, "scaler", None)
    torch.save(
        {
            "step": step,
            "position": list(position),  # (epoch, batches read in it) of this rank's data order
            "world_size": accelerator.num_processes,
            "optimizers": [o.state_dict() for o in optimizers],
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,  # one entry per rank
        },
        path,
    )


def restore_training_state(state: dict, accelerator, optimizers, scheduler, generator: torch.Generator) -> tuple[int, tuple[int, int]]:
    """Load optimizers, scheduler, scaler and this rank's RNG states; returns (step, data position)."""
    for opt, saved in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) != accelerator.num_processes and accelerator.is_main_process:
        warn(f"the checkpoint was written by {len(rng)} processes and this run has {accelerator.num_processes}; "
             "training continues, but not exactly as an uninterrupted run would")
    set_rng_state(rng[accelerator.process_index % len(rng)], generator)
    return int(state["step"]), tuple(state["position"])


# ----------------------------------------------------------------------------- several processes


def gather_rng(accelerator, generator: torch.Generator) -> list[dict]:
    """Every rank's RNG states, in rank order (a collective: call it on every rank)."""
    mine = rng_state(generator)
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def agree(accelerator, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """(the loss averaged over ranks, whether any rank asks to stop), in one collective so all ranks act alike.

    A non-finite loss on any rank makes the average non-finite on every rank.
    """
    stats = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, "mean")
    return float(stats[0]), bool(stats[1] > 0)


def check_same(accelerator, value, problem: str):
    """`value`, after checking that every rank holds the same one (a collective); else TrainError(problem)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        values = gather_object([value])
        if len({repr(v) for v in values}) != 1:
            raise TrainError(f"{problem} (per rank: {values})")
    return value


def check_in_sync(accelerator, module: nn.Module | dict, what: str) -> str:
    """The weights' hash, after checking that every rank holds the same weights (a collective)."""
    return check_same(accelerator, state_hash(module), f"the {what} weights differ between processes")


def debug_record(accelerator, **fields) -> None:
    """Append fields to $DIFFUSION_DEBUG_DIR/rank<r>.jsonl (tests check sharding and weight sync with it)."""
    folder = os.environ.get(DEBUG_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\n")


# ----------------------------------------------------------------------------- data order


class ShardedOrder:
    """Which dataset indices each rank reads: a seeded permutation per epoch, dealt out to the ranks.

    The order is a function of (seed, epoch) alone, so a resumed run reads exactly what an uninterrupted
    one would: it rebuilds its epoch's permutation and starts at the saved batch. Every rank gets the
    same number of full batches (the tail of the permutation is dropped, a new one each epoch).
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, rank: int, world_size: int):
        self.indices, self.batch_size, self.seed = list(indices), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(self.indices) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise TrainError(
                f"{len(self.indices)} training images are fewer than batch_size {batch_size} x {world_size} "
                "processes; lower the batch size or add images"
            )

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.indices), generator=g).tolist()
        mine = [self.indices[i] for i in perm[self.rank :: self.world_size]]
        bs = self.batch_size
        return [mine[b * bs : (b + 1) * bs] for b in range(start, self.batches_per_epoch)]


def batch_stream(order: ShardedOrder, position: tuple[int, int], load: Callable[[int, list[list[int]]], Iterable]):
    """Endless (position after this batch, batch), from position = (epoch, batch in epoch) on.

    `load(epoch, index batches)` turns an epoch's index batches into batches (a DataLoader, or the indices).
    """
    epoch, start = position
    while True:
        for b, batch in enumerate(load(epoch, order.batches(epoch, start)), start=start):
            yield (epoch, b + 1), batch
        epoch, start = epoch + 1, 0


def epoch_loader(dataset, num_workers: int, seed: int) -> Callable[[int, list[list[int]]], Iterable]:
    """load(epoch, index batches) -> a DataLoader over them, for batch_stream.

    The loader's own generator (seeded by epoch) draws the worker seeds; by default they would come
    from torch's global RNG, which a resumed run would then draw at a different point.
    """

    def load(epoch: int, batches: list[list[int]]):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=g)

    return load


# ----------------------------------------------------------------------------- caches


def sharded_map(accelerator, n: int, fn: Callable[[list[int]], torch.Tensor], batch_size: int) -> torch.Tensor:
    """torch.cat([fn(batch) for batches of range(n)]), with the work split over the ranks and gathered.

    Rank r computes items r, r + W, ...; every rank ends with all n rows, so none waits on another's
    long preprocessing (the cause of multi-GPU start-up time-outs).
    """
    W, r = accelerator.num_processes, accelerator.process_index
    mine = list(range(r, n, W))
    rows = [fn(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]
    local = torch.cat(rows) if rows else None
    if W == 1:
        return local
    per_rank = math.ceil(n / W)
    if local is None:  # more ranks than items: learn the row shape from one item
        local = fn([0])[:0]
    pad = local.new_zeros((per_rank - local.shape[0], *local.shape[1:]))
    gathered = accelerator.gather(torch.cat([local, pad]).to(accelerator.device)).cpu()
    out = gathered.new_empty((n, *gathered.shape[1:]))
    for rank in range(W):
        count = len(range(rank, n, W))
        out[rank::W] = gathered[rank * per_rank : rank * per_rank + count]
    return out


def files_fingerprint(paths: Iterable[Path]) -> str:
    """A hash of file names, sizes and modification times: it changes when any file does."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_tensors(
    path: Path, key: str, build: Callable[[], dict[str, torch.Tensor]], accelerator
) -> dict[str, torch.Tensor]:
    """Tensors stored at `path` under `key`; rebuilt (on every rank) and saved (by the main process) on a miss."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - a broken cache file is rebuilt, never fatal
            pass
    tensors = build()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    return tensors


class LatentSource:
    """Scaled latents z0 and the U-Net's conditioning for the batches of `batch_stream`.

    Latents: with training.cache_latents and no random crop, each image (and with data.flip its mirror)
    is encoded once, its posterior mean and std are kept in output_dir/cache, and every batch samples
    z = mean + std·n from them; otherwise each batch is encoded on the fly. Text: a frozen encoder's
    hidden states are cached per distinct caption (and ""); a trainable one gets token ids.
    The cache keys hash the file list (names, sizes, mtimes), the transform and the encoder weights,
    so changed data or another VAE never reuses stale latents.
    """

    def __init__(self, pipe, dataset, cfg, cache_dir: Path, accelerator, batch_size: int = 32):
        self.pipe, self.dataset, self.cfg, self.acc = pipe, dataset, cfg, accelerator
        self.device, self.batch_size = accelerator.device, batch_size
        self.cached = cfg.training.cache_latents and cfg.data.crop == "center"
        self.indices = list(range(len(dataset)))
        if self.cached:
            moments = self._latent_cache(cache_dir / "latents.safetensors")["moments"]  # (N, 2, F, C, h, w)
            usable = moments.flatten(1).isfinite().all(1)  # images that failed to load are NaN rows
            self.indices = usable.nonzero().flatten().tolist()
            self.mean, self.std = moments.to(self.device).unbind(1)  # (N, F, C, h, w) each
        if not cfg.text_encoder.trainable:
            captions = sorted({c for i in range(len(dataset)) for c in dataset.captions(i)} | {""})
            self.row = {c: r for r, c in enumerate(captions)}
            self.text = self._text_cache(cache_dir / "text.safetensors", captions)["hidden"].to(self.device)

    def load(self, epoch: int, batches: list[list[int]]) -> Iterable[dict]:
        if self.cached:
            return ({"index": torch.tensor(b)} for b in batches)
        return epoch_loader(self.dataset, self.cfg.data.num_workers, self.cfg.seed)(epoch, batches)

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """z0 = z·scale_factor with z ~ q(z|x): (B, C, h, w)."""
        if not self.cached:
            return self.pipe.encode(batch["pixels"].to(self.device), generator=generator, sample=True)
        idx = batch["index"].to(self.device)
        views = torch.randint(self.mean.shape[1], (len(idx),), generator=generator, device=self.device)  # flip or not
        mean, std = self.mean[idx, views], self.std[idx, views]
        noise = torch.randn(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        return (mean + std * noise) * self.pipe.cfg.vae.scale_factor

    def conditioning(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Hidden states (B, L, D) from the text cache, or token ids (B, L) for a trainable encoder."""
        captions = batch["caption"] if "caption" in batch else self._draw_captions(batch["index"].tolist(), generator)
        if self.cfg.text_encoder.trainable:
            return self.pipe.text_encoder.tokenize(list(captions)).to(self.device)
        return self.text[[self.row[c] for c in captions]]

    def _draw_captions(self, indices: list[int], generator: torch.Generator) -> list[str]:
        """What the dataset's train mode draws: one of each image's captions, dropped to "" with probability p."""
        u = torch.rand(2, len(indices), generator=generator, device=self.device).tolist()
        out = []
        for i, pick, drop in zip(indices, *u):
            caps = self.dataset.captions(i)
            out.append("" if drop < self.cfg.data.caption_dropout else caps[min(int(pick * len(caps)), len(caps) - 1)])
        return out

    def _latent_cache(self, path: Path) -> dict[str, torch.Tensor]:
        d = self.cfg.data
        key = json.dumps([files_fingerprint(p for p, _ in self.dataset.items), d.resolution, d.crop, d.flip, state_hash(self.pipe.vae)])
        views = 2 if d.flip else 1
        f, C = self.pipe.vae_factor, self.pipe.cfg.vae.latent_channels

        @torch.no_grad()
        def encode(rows: list[int]) -> torch.Tensor:
            out = torch.full((len(rows), 2, views, C, d.resolution // f, d.resolution // f), float("nan"))
            pixels = [self.dataset.pixels_for_cache(i) for i in rows]
            ok = [k for k, p in enumerate(pixels) if p is not None]
            if ok:
                x = torch.stack([pixels[k] for k in ok]).to(self.device)
                for v, view in enumerate([x, x.flip(-1)][:views]):
                    posterior = self.pipe.vae.encode(view)
                    out[ok, 0, v], out[ok, 1, v] = posterior.mean.cpu(), posterior.std.cpu()
            return out

        build = lambda: {"moments": sharded_map(self.acc, len(self.dataset), encode, self.batch_size)}  # noqa: E731
        return cached_tensors(path, hashlib.sha256(key.encode()).hexdigest(), build, self.acc)

    def _text_cache(self, path: Path, captions: list[str]) -> dict[str, torch.Tensor]:
        te = self.pipe.text_encoder
        key = hashlib.sha256(json.dumps([captions, te.cfg.layer, state_hash(te)]).encode()).hexdigest()

        @torch.no_grad()
        def encode(rows: list[int]) -> torch.Tensor:
            return te.encode([captions[r] for r in rows]).float().cpu()

        build = lambda: {"hidden": sharded_map(self.acc, len(captions), encode, self.batch_size)}  # noqa: E731
        return cached_tensors(path, key, build, self.acc)


# ----------------------------------------------------------------------------- models

VAE_CONFIG, VAE_WEIGHTS = "vae.yaml", "vae.safetensors"


class Denoiser(nn.Module):
    """The trained part of the LDM as one module, net(x_t, t, cond) -> ε, so that DDP wraps and syncs it whole.

    cond is the text encoder's hidden states (B, L, D) when the encoder is frozen (they come from a
    cache), or token ids (B, L) when it trains: it then runs inside this forward, where DDP sees it.
    """

    def __init__(self, unet: nn.Module, text_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        if text_encoder is not None:
            freeze_unused(text_encoder)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            cond = self.text_encoder(cond)[0]  # token ids -> hidden states (B, L, D)
        return self.unet(x_t, t, cond)


def freeze_unused(text_encoder: nn.Module) -> None:
    """Freeze the parameters that the hidden states never depend on (CLIP's pooled projection, and the
    last block under layer=penultimate): they get no gradient, which DDP reports as an error."""
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(text_encoder.tokenize([""]).to(device))[0]
    grads = torch.autograd.grad(hidden.sum(), params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)


def save_vae(vae: nn.Module, vae_cfg, folder: Path) -> None:
    """Write folder/vae.safetensors, then folder/vae.yaml (its config, with the latent scale) last: the
    config's presence marks a finished VAE."""
    from .config import save_config

    folder.mkdir(parents=True, exist_ok=True)
    save_weights(vae, folder / VAE_WEIGHTS)
    tmp = folder / (VAE_CONFIG + ".tmp")
    save_config(vae_cfg, tmp)
    os.replace(tmp, folder / VAE_CONFIG)


def load_vae(source: str | Path, default_cfg):
    """(VAEConfig, AutoencoderKL) from a pipeline folder, a VAE folder (vae.yaml) or a weights file.

    A weights file brings no config: its architecture and scale_factor come from `default_cfg` (vae.*).
    """
    from .config import PipelineConfig, VAEConfig, from_dict, load_yaml
    from .pipeline import CONFIG_FILE
    from .vae import AutoencoderKL
    from .weights import load_state_dict_checked

    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        vae_cfg, weights = from_dict(PipelineConfig, load_yaml(path / CONFIG_FILE)).vae, path / "vae.safetensors"
    elif (path / VAE_CONFIG).is_file():
        vae_cfg, weights = from_dict(VAEConfig, load_yaml(path / VAE_CONFIG)), path / VAE_WEIGHTS
    elif path.is_file():
        vae_cfg, weights = default_cfg, path
    else:
        raise TrainError(f"no VAE at {path}: expected a model folder ({CONFIG_FILE}), a VAE folder ({VAE_CONFIG}) or a weights file")
    vae = AutoencoderKL(vae_cfg)
    load_state_dict_checked(vae, load_weights_file(weights), what=f"VAE weights {weights}")
    return vae_cfg, vae.requires_grad_(False).eval()


# ----------------------------------------------------------------------------- VAE losses


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017), as LDM's NLayerDiscriminator: each output logit judges one patch.

    GroupNorm instead of BatchNorm, so real and fake images can share one forward pass and DDP has no
    batch statistics to synchronise. Use fewer layers for small images (`layers_for`).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(32, out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def layers_for(resolution: int) -> int:
        """3 layers (70x70 patches) from 128 px; fewer below, so the last map stays at least 2x2."""
        return max(1, min(3, int(math.log2(resolution)) - 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) logits


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel: on CPU it is ~10x faster than the per-tensor loop, which matters
    for a text encoder whose 49k-token embedding dwarfs a small U-Net."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def vae_loss(x: torch.Tensor, x_rec: torch.Tensor, posterior, kind: str, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction loss, total loss) = (rec, rec + kl_weight·KL), per pixel.

    LDM sums both terms over pixels; dividing the whole loss by the pixel count keeps LDM's balance
    (so kl_weight 1e-6 means the same) with a loss of order 0.1 instead of 1e3.
    """
    err = (x - x_rec).abs() if kind == "l1" else (x - x_rec).pow(2)
    rec = err.mean()
    kl = posterior.kl().mean() / x[0].numel()
    return rec, rec + kl_weight * kl


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """λ = ‖∇_L rec‖ / (‖∇_L adv‖ + 1e-4) at the decoder's last layer L (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) (Lim & Ye 2017; LDM)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2, so MAX² = 4)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean())


# ----------------------------------------------------------------------------- logging


class MetricsLogger:
    """One JSON line per log call in output_dir/metrics.jsonl, and TensorBoard through Accelerate when set up.

    Only the main process writes. Each line has the stage, the step and the wall time.
    """

    def __init__(self, path: Path, accelerator, trackers: bool = False):
        self.path, self.accelerator, self.trackers = path, accelerator, trackers

    def log(self, stage: str, step: int, **values: float) -> None:
        if not self.accelerator.is_main_process:
            return
        # A non-finite value (a skipped step) is written as null: NaN is not JSON.
        values = {k: (float(v) if math.isfinite(v) else None) if isinstance(v, (int, float)) else v for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.trackers:
            self.accelerator.log({f"{stage}/{k}": v for k, v in values.items() if isinstance(v, float)}, step=step)

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop this stage's lines past `after_step`: a resumed run logs those steps again."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if not _is_after(ln, stage, after_step)]
        if len(keep) != len(lines):
            self.path.write_text("".join(ln + "\n" for ln in keep))


def _is_after(line: str, stage: str, step: int) -> bool:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return True  # half a line from a killed run
    return entry.get("stage") == stage and entry.get("step", 0) > step


# ----------------------------------------------------------------------------- stopping


class StopRequest:
    """Set by SIGINT or SIGTERM while installed: the loop then saves a checkpoint and exits at the step's end.

    A second SIGINT kills as usual. $DIFFUSION_STOP_AT="<stage>:<step>" requests the same stop after
    that step, for tests that need an interruption at a known point.
    """

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous: dict[int, object] = {}
        stage, _, step = os.environ.get(STOP_ENV, "").partition(":")
        self._at = (stage, int(step)) if step.isdigit() else None

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        print(f"\n{self.signal} received: saving a checkpoint after this step, then exiting", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def requested(self, stage: str, step: int) -> bool:
        if self._at == (stage, step):
            self.signal = STOP_ENV
        return self.signal is not None
