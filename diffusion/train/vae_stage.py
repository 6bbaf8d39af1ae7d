"""Stage 1: the KL autoencoder (LDM's first stage), trained on the images alone.

The loss is L1 or L2 reconstruction plus KL, and a PatchGAN term from vae_training.disc_start on.
At the end the latent scale is set to 1/std(z) (LDM's scale_by_std) and output_dir/vae/ is exported.
Checkpoints hold vae.safetensors, discriminator.safetensors (with a GAN term) and state.pt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR

from ..data import ImageCaptionDataset
from ..data.shards import ShardIndex, ShardOrder, head, shard_loader
from ..eval.image import psnr
from ..io.vae_folder import save_vae
from ..io.weights import load_state_dict_checked, save_weights
from ..models.discriminator import PatchDiscriminator
from ..models.vae import AutoencoderKL
from ..pipeline import image_grid, to_pil
from .augment import Augmentation, mirror, rotate_hue, shuffle_channels
from .distributed import make_generator
from .loop import Run, Stage
from .optim import adamw, lr_lambda
from .order import ShardedOrder, epoch_loader


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


def split_val(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-back, training) indices: a seeded choice of n_val images kept out of VAE training."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n_val, n // 2)
    return sorted(perm[:n_val]), sorted(perm[n_val:])


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, seed: int, batch: int = 64) -> float:
    """1/std(z) over posterior samples of `images` (LDM's scale_by_std), so the U-Net sees unit-variance latents."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    z = torch.cat([vae.encode(images[i : i + batch]).sample(g) for i in range(0, len(images), batch)])
    return 1.0 / float(z.float().std())


class VAEStage(Stage):
    name, title = "vae", "VAE"

    def __init__(self, run: Run):
        cfg, acc, vc = run.cfg, run.accelerator, run.cfg.vae_training
        self.run, self.vc = run, vc
        self.root = run.out / "vae"
        self.checkpoints, self.max_steps, self.checkpoint_every = self.root / "checkpoints", vc.max_steps, vc.checkpoint_every
        self.images_per_step, self.grad_clip = vc.batch_size * acc.num_processes, vc.grad_clip
        set_seed(cfg.seed)
        self.vae = run.layout(AutoencoderKL(cfg.vae).to(acc.device))
        self.params = list(self.vae.parameters())
        self.optimizer = adamw(self.params, lr=vc.lr, betas=vc.adam_betas, weight_decay=0.0)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(vc.warmup_steps, vc.max_steps, vc.lr_schedule))
        self.vae_ddp, self.optimizer = acc.prepare(self.vae, self.optimizer)
        self.disc = None
        if vc.disc_start >= 0:  # the discriminator keeps a constant learning rate
            self.disc = PatchDiscriminator(n_layers=PatchDiscriminator.layers_for(cfg.data.resolution)).to(acc.device)
            d_opt = adamw(self.disc.parameters(), lr=vc.lr, betas=vc.adam_betas, weight_decay=0.0)
            self.disc_ddp, self.d_opt = acc.prepare(self.disc, d_opt)

        self.generator = make_generator(acc, cfg.seed, stream=1)
        self.augment = Augmentation(None, cfg.data)  # flips only
        if isinstance(run.index, ShardIndex):
            self.stream_shards(run)
            return
        self.dataset = ImageCaptionDataset(run.index, cfg.data, train=True)
        self.val_idx, self.train_idx = split_val(len(self.dataset), vc.val_images, cfg.seed)
        self.plain = ImageCaptionDataset(run.index, cfg.data, train=False)
        self.val = torch.stack([self.plain[i]["pixels"] for i in self.val_idx]).to(acc.device)
        self.scale_images = lambda: torch.stack([self.plain[i]["pixels"] for i in self.train_idx[: vc.scale_samples]])
        self.order = ShardedOrder(self.train_idx, vc.batch_size, cfg.seed, acc.process_index, acc.num_processes)
        self.load = epoch_loader(self.dataset, cfg.data.num_workers, cfg.seed)

    def stream_shards(self, run: Run) -> None:
        """Shards: the first val_images usable samples are held back (left out of the stream), the next
        scale_samples set the latent scale."""
        cfg, acc, vc = run.cfg, run.accelerator, self.vc
        first = head(run.index, min(vc.val_images, len(run.index) // 2) + vc.scale_samples, cfg.data)
        n_val = min(vc.val_images, len(first) // 2)
        self.val = torch.stack([s["pixels"] for s in first[:n_val]]).to(acc.device)
        self.scale_images = lambda: torch.stack([s["pixels"] for s in first[n_val:]])
        self.order = ShardOrder(run.index, vc.batch_size, cfg.seed, acc.process_index, acc.num_processes, cfg.data.num_workers)
        self.load = shard_loader(self.order, cfg.data, vc.batch_size, cfg.seed, exclude=frozenset(s["id"] for s in first[:n_val]))

    @property
    def optimizers(self) -> list:
        return [self.optimizer] + ([self.d_opt] if self.disc is not None else [])

    def forward_backward(self, stream: Iterator, step: int) -> tuple[torch.Tensor, tuple[int, int], list[int]]:
        position, batch = next(stream)
        x = batch["pixels"].to(self.run.accelerator.device)
        x = mirror(x, self.augment.flips(len(x), self.generator).to(x.device))
        x = shuffle_channels(x, self.vc.color_shuffle, self.generator)
        x = rotate_hue(x, self.vc.hue_rotate, self.generator)
        x_rec, posterior = self.vae_ddp(x, sample=True, generator=self.generator)  # x̂ from z ~ q(z|x)
        self.rec, loss = vae_loss(x, x_rec, posterior, self.vc.rec_loss, self.vc.kl_weight)
        self.gan = self.disc is not None and step >= self.vc.disc_start
        if self.gan:
            self.disc.requires_grad_(False)  # the generator's term must not train the discriminator
            g_loss = -self.disc(x_rec).mean()
            self.disc.requires_grad_(True)
            loss = loss + self.vc.disc_weight * adaptive_weight(self.rec, g_loss, self.vae.decoder.conv_out.weight) * g_loss
        self.run.accelerator.backward(loss)
        self.x, self.x_rec = x, x_rec.detach()
        return loss, position, batch["index"].tolist()

    def after_update(self, step: int) -> None:
        """The discriminator's step: real against reconstructed images."""
        if not self.gan:
            return
        logits = self.disc_ddp(torch.cat([self.x, self.x_rec]))
        self.run.accelerator.backward(hinge_d_loss(*logits.chunk(2)))
        self.d_opt.step()
        self.d_opt.zero_grad(set_to_none=True)

    def log_values(self, step: int) -> dict[str, float]:
        return {"rec": float(self.rec.detach())}

    def restore(self, weights: dict, path: Path) -> None:
        load_state_dict_checked(self.vae, weights["vae"], what=str(path))
        if self.disc is not None:
            load_state_dict_checked(self.disc, weights["discriminator"], what=str(path))

    def save(self, folder: Path) -> None:
        save_weights(self.vae, folder / "vae.safetensors")
        if self.disc is not None:
            save_weights(self.disc, folder / "discriminator.safetensors")

    def preview(self, step: int) -> None:
        self.run.logger.log("vae", step, psnr=self.reconstruct(step))

    @torch.no_grad()
    def reconstruct(self, step: int) -> float:
        """PSNR of the held-back images' reconstructions (posterior mean); saves originals over reconstructions."""
        vae, val = self.vae.eval(), self.val
        recon = torch.cat([vae.decode(vae.encode(val[i : i + 32]).mode()) for i in range(0, len(val), 32)])
        vae.train()
        shown = min(8, len(val))
        folder = self.root / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        image_grid(to_pil(torch.cat([val[:shown], recon[:shown]])), cols=shown).save(folder / f"step-{step:06d}.png")
        return psnr(val, recon)

    def synced(self) -> dict:
        return {"weights": (self.vae, "VAE")}

    def export(self, step: int) -> None:
        """Set the latent scale over a sample of the data, then write output_dir/vae/."""
        cfg = self.run.cfg
        self.vae.eval()
        images = self.scale_images().to(self.run.accelerator.device)
        vae_cfg = dataclasses.replace(cfg.vae, scale_factor=latent_scale(self.vae, images, cfg.seed))
        save_vae(self.vae, vae_cfg, self.root)
        value = self.reconstruct(step)
        self.run.logger.log("vae", step, psnr=value, scale_factor=vae_cfg.scale_factor)
        self.run.say(
            f"VAE done: PSNR {value:.2f} dB on {len(self.val)} held-back images, latent scale {vae_cfg.scale_factor:.5f}; saved {self.root}"
        )
