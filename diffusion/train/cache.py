"""The latent and text caches: encode each image and caption once, keyed so that stale entries are never reused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..io.atomic import atomic_file
from ..io.weights import state_hash
from .augment import Augmentation, mirror
from .distributed import sharded_map
from .order import epoch_loader


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
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})
    return tensors


class LatentSource:
    """Scaled latents z0 and the U-Net's conditioning for the batches of `batch_stream`.

    Latents: with training.cache_latents and no random crop, each image (and with data.flip its mirror)
    is encoded once, its posterior mean and std are kept in output_dir/cache, and every batch samples
    z = mean + std·n from them; otherwise each batch is encoded on the fly. Text: a frozen encoder's
    hidden states are cached per distinct caption (and ""); a trained one (or one with adapters) gets token ids.
    The cache keys hash the file list (names, sizes, mtimes), the transform and the encoder weights,
    so changed data or another VAE never reuses stale latents.
    """

    def __init__(self, pipe, dataset, cfg, cache_dir: Path, accelerator, text_trains: bool | None = None, batch_size: int = 32):
        self.pipe, self.dataset, self.cfg, self.acc = pipe, dataset, cfg, accelerator
        # Token ids for a text encoder that trains (itself, or adapters on it); else cached hidden states.
        self.text_trains = cfg.text_encoder.trainable if text_trains is None else text_trains
        self.device, self.batch_size = accelerator.device, batch_size
        self.augment = Augmentation(dataset, cfg.data)
        self.cached = cfg.training.cache_latents and cfg.data.crop == "center"
        self.indices = list(range(len(dataset)))
        if self.cached:
            moments = self._latent_cache(cache_dir / "latents.safetensors")["moments"]  # (N, 2, F, C, h, w)
            usable = moments.flatten(1).isfinite().all(1)  # images that failed to load are NaN rows
            self.indices = usable.nonzero().flatten().tolist()
            self.mean, self.std = moments.to(self.device).unbind(1)  # (N, F, C, h, w) each; F = 2 with flips
        if not self.text_trains:
            captions = sorted({c for i in range(len(dataset)) for c in dataset.captions(i)} | {""})
            self.row = {c: r for r, c in enumerate(captions)}
            self.text = self._text_cache(cache_dir / "text.safetensors", captions)["hidden"].to(self.device)

    def load(self, epoch: int, batches: list[list[int]]) -> Iterable[dict]:
        if self.cached:
            return ({"index": torch.tensor(b)} for b in batches)
        return epoch_loader(self.dataset, self.cfg.data.num_workers, self.cfg.seed)(epoch, batches)

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """z0 = z·scale_factor with z ~ q(z|x) of the (possibly mirrored) images: (B, C, h, w)."""
        flips = self.augment.flips(len(batch["index"]), generator).to(self.device)
        if not self.cached:
            x = mirror(batch["pixels"].to(self.device), flips)
            return self.pipe.encode(x, generator=generator, sample=True)
        idx = batch["index"].to(self.device)
        mean, std = self.mean[idx, flips.long()], self.std[idx, flips.long()]
        noise = torch.randn(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        return (mean + std * noise) * self.pipe.cfg.vae.scale_factor

    def conditioning(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Hidden states (B, L, D) from the text cache, or token ids (B, L) for a trainable encoder."""
        captions = self.augment.captions(batch["index"].tolist(), generator)
        if self.text_trains:
            return self.pipe.text_encoder.tokenize(captions).to(self.device)
        return self.text[[self.row[c] for c in captions]]

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
