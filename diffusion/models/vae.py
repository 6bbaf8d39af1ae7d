"""KL-regularised autoencoder (LDM's AutoencoderKL, Rombach et al. 2022, appendix G).

Images in [-1, 1] of shape (B, 3, H, W) map to a diagonal Gaussian over latents of shape
(B, latent_channels, H/f, W/f), with f = 2 ** (len(channel_mult) - 1). The latent scale factor lives
in the config; the pipeline multiplies by it before the U-Net and divides by it before decoding.

As in the U-Net (see unet.py), conv weights and activations live in channels_last memory, which
oneDNN's convolutions and nearest-neighbour upsampling run faster on; inputs and outputs keep
the usual contiguous (B, C, H, W) layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VAEConfig
from .layers import Conv2d, Downsample, ResBlock, SelfAttention2d, Upsample, norm_silu


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in LDM so that exp() stays finite early in training.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.channels
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, cfg.channels * mult, groups=g))
                ch = cfg.channels * mult
            if level < len(cfg.channel_mult) - 1:
                blocks.append(Downsample(ch, asymmetric_pad=True))
        self.blocks = nn.Sequential(*blocks)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, groups=g),
            SelfAttention2d(ch, g) if cfg.mid_attention else nn.Identity(),
            ResBlock(ch, ch, groups=g),
        )
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
        self.conv_out = Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(norm_silu(self.norm_out, h))  # (B, 2*latent_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        ch = cfg.channels * cfg.channel_mult[-1]
        self.conv_in = Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, groups=g),
            SelfAttention2d(ch, g) if cfg.mid_attention else nn.Identity(),
            ResBlock(ch, ch, groups=g),
        )
        blocks: list[nn.Module] = []
        for level in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, cfg.channels * cfg.channel_mult[level], groups=g))
                ch = cfg.channels * cfg.channel_mult[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-6)
        self.conv_out = Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.mid(self.conv_in(z)))
        return self.conv_out(norm_silu(self.norm_out, h))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        for mult in cfg.channel_mult:
            if (cfg.channels * mult) % cfg.norm_groups:
                raise ValueError(f"VAE width {cfg.channels * mult} must be divisible by norm_groups={cfg.norm_groups}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.to(memory_format=torch.channels_last)

    @property
    def factor(self) -> int:
        return self.cfg.factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1], with H and W divisible by the factor f."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the VAE factor {self.factor}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)).contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
