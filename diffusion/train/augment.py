"""The random choices made per training image, drawn in one place from the run's own generator.

Whether latents come from the cache or are encoded on the fly, and in both stages, a batch draws its
flips first (only with data.flip) and its captions after the latents, so the same seed makes the same
choices either way, and a resumed run makes them again exactly. (A random crop is drawn by the
dataset, in its DataLoader workers, which `epoch_loader` seeds per epoch.)
"""

from __future__ import annotations

import torch

from ..config import DataConfig


class Augmentation:
    """Horizontal flips, and one caption per image with caption dropout (for classifier-free guidance)."""

    def __init__(self, dataset, cfg: DataConfig):
        self.dataset, self.cfg = dataset, cfg

    def flips(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) bool on the generator's device: which images to mirror. All False without data.flip."""
        if not self.cfg.flip:
            return torch.zeros(n, dtype=torch.bool, device=generator.device)
        return torch.randint(2, (n,), generator=generator, device=generator.device).bool()

    def captions(self, indices: list[int], generator: torch.Generator) -> list[str]:
        """One of each image's captions, replaced by "" with probability data.caption_dropout."""
        return self.pick([self.dataset.captions(i) for i in indices], generator)

    def pick(self, choices: list[list[str]], generator: torch.Generator) -> list[str]:
        """One caption of each list (a streamed batch brings its own), or "" with probability data.caption_dropout."""
        pick, drop = torch.rand(2, len(choices), generator=generator, device=generator.device).tolist()
        out = []
        for caps, u, d in zip(choices, pick, drop):
            out.append("" if d < self.cfg.caption_dropout else caps[min(int(u * len(caps)), len(caps) - 1)])
        return out


def mirror(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """x (B, ..., W) with the images where flips is True mirrored left-right."""
    return torch.where(flips.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


# The five orders of (R, G, B) other than the identity.
_CHANNEL_ORDERS = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def shuffle_channels(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """x (B, 3, H, W) with each image's color channels put in another order with probability p.

    The VAE then meets hues that the data lacks (yellow's permutations include cyan and magenta), so
    it can encode and decode colors that a later data set or adapter brings. Nothing is drawn at p = 0.
    """
    if p <= 0:
        return x
    u, k = torch.rand(x.shape[0], generator=generator, device=generator.device), torch.randint(
        len(_CHANNEL_ORDERS), (x.shape[0],), generator=generator, device=generator.device)
    orders = torch.where((u < p)[:, None], _CHANNEL_ORDERS.to(k.device)[k], torch.arange(3, device=k.device))
    return torch.gather(x, 1, orders.to(x.device)[:, :, None, None].expand_as(x))


def rotate_hue(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] with each image's hue turned by a uniform random angle, with probability p.

    Unlike `shuffle_channels`, which offers a few fixed hues, this covers the whole color circle, so the
    VAE learns a map of color in general rather than of the hues it saw. The rotation turns RGB about
    the grey axis with the luma weights of the W3C filter effects' hue-rotate (0.213, 0.715, 0.072), so
    black and white stay as they are. Nothing is drawn at p = 0.
    """
    if p <= 0:
        return x
    u, angle = torch.rand(2, x.shape[0], generator=generator, device=generator.device)
    theta = torch.where(u < p, angle * 2 * torch.pi, torch.zeros_like(angle)).to(x.device, x.dtype)
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]  # (B, 1, 1)
    luma = torch.tensor([0.213, 0.715, 0.072], dtype=x.dtype, device=x.device)
    grey = luma.expand(3, 3)  # each row: the luma weights
    cos_part = torch.eye(3, dtype=x.dtype, device=x.device) - grey
    sin_part = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]],
                            dtype=x.dtype, device=x.device)
    m = grey + c * cos_part + s * sin_part  # (B, 3, 3)
    rgb = (x + 1) / 2
    return (torch.einsum("bij,bjhw->bihw", m, rgb).clamp(0, 1) * 2 - 1).to(x.dtype)
