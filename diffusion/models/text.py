"""CLIP text encoder: CLIP's text transformer and open_clip's BPE tokenizer.

The tower is either an open_clip architecture (`arch: ViT-L-14`, with its text config) or a small
custom tower trained from scratch. Captions become per-token hidden states (B, L, width) from the
last or the penultimate layer, after the final LayerNorm (SD v1 uses the last, SD v2 the
penultimate), plus CLIP's pooled, projected embedding (B, embed_dim).

Token ids come from open_clip's bundled BPE vocabulary, or from a Hugging Face tokenizer folder
(`tokenizer`), whose ids match transformers' CLIPTokenizer. Positions after the end token hold
`pad_id`: SD v1 pads with <|endoftext|>, SD v2 and open_clip with "!" (id 0), and the pad changes
the image. diffusion.io.sd_text maps Stable Diffusion's text encoder weights to and from ours.

Nothing here imports the open_clip package (it takes seconds, openclip_files.py says why): the tower
is clip_text.py's, in open_clip's layout, and the tokenizer and the architectures are open_clip's files.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import TextEncoderConfig, check_text_layer
from ..io.weights import load_weights_file, load_state_dict_checked
from . import openclip_files
from .clip_text import build_text_tower
from .tokenizer import FolderTokenizer, bundled_tokenizer


@functools.lru_cache(maxsize=None)
def _tokenizer(context_length: int, folder: str | None = None):
    # Building the BPE tables takes a tenth of a second or more; every encoder with this context and vocabulary shares one.
    if folder is None:
        return bundled_tokenizer(context_length)
    from ..io.sd_text import read_tokenizer

    return FolderTokenizer(read_tokenizer(folder), context_length)


def _tower_config(cfg: TextEncoderConfig) -> tuple[int, dict, bool]:
    """(embed_dim, text_cfg, quick_gelu) for the configured tower, with the config's overrides."""
    embed_dim, text_cfg, quick_gelu = _arch_tower_config(cfg)
    if cfg.embed_dim is not None:
        embed_dim = cfg.embed_dim
    if cfg.activation is not None:
        quick_gelu = cfg.activation == "quick_gelu"
    return embed_dim, text_cfg, quick_gelu


def _arch_tower_config(cfg: TextEncoderConfig) -> tuple[int, dict, bool]:
    """(embed_dim, text_cfg, quick_gelu) of the named architecture, or of the custom tower."""
    if cfg.arch is None:
        text_cfg = dict(
            context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width, heads=cfg.heads, layers=cfg.layers
        )
        return cfg.width, text_cfg, False
    model_cfg = openclip_files.model_config(cfg.arch)
    if model_cfg is None:
        raise ValueError(f"text_encoder.arch: unknown open_clip architecture '{cfg.arch}' (see open_clip.list_models())")
    text_cfg = dict(model_cfg["text_cfg"])
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"text_encoder.arch: '{cfg.arch}' uses a Hugging Face text tower, which is not supported")
    return model_cfg["embed_dim"], text_cfg, bool(model_cfg.get("quick_gelu", False))


def text_width(cfg: TextEncoderConfig) -> int:
    """Width of the hidden states the U-Net cross-attends to (its context_dim)."""
    return _tower_config(cfg)[1]["width"]


def _text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept our own weights, a whole open_clip CLIP checkpoint, a Hugging Face CLIPTextModel or an SD
    single-file checkpoint, and keep the text tower's tensors in open_clip's layout."""
    from ..io import sd_text

    if sd_text.is_sd_text_layout(state):
        return {k[len("tower."):]: v for k, v in sd_text.native_from_sd(state).items()}
    if any(k.startswith("tower.") for k in state):
        return {k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")}
    if any(k.startswith("text.") for k in state):  # open_clip's CustomTextCLIP
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    # open_clip's CLIP keeps the text tower's tensors at the top level beside `visual.*`.
    skip = ("visual.", "logit_scale", "logit_bias")
    return {k: v for k, v in state.items() if not k.startswith(skip)}


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        embed_dim, text_cfg, quick_gelu = _tower_config(cfg)
        self.tower = build_text_tower(embed_dim, text_cfg, quick_gelu, what=f"text_encoder.arch: '{cfg.arch}'")
        check_text_layer(cfg.layer, len(self.tower.transformer.resblocks))
        self.activation = "quick_gelu" if quick_gelu else "gelu"
        self.context_length = self.tower.context_length
        self.width = self.tower.width
        self.tokenizer = _tokenizer(self.context_length, cfg.tokenizer)
        self.pad_id = self._pad_id()
        self._warned_truncation = False
        if cfg.pretrained:
            self.load_pretrained(cfg.pretrained)
        self.requires_grad_(cfg.trainable)
        if not cfg.trainable:
            self.eval()

    def _pad_id(self) -> int:
        """The configured pad id, else the tokenizer folder's pad token, else 0 as open_clip pads."""
        pad = self.cfg.pad_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.cfg.tokenizer is not None else 0
        if not 0 <= pad < self.tower.vocab_size:
            raise ValueError(f"text_encoder.pad_id {pad} is outside the vocabulary of {self.tower.vocab_size} tokens")
        return pad

    def load_pretrained(self, pretrained: str) -> None:
        """Load a local weights file, or else an open_clip pretrained tag (which downloads)."""
        if Path(pretrained).is_file():
            state = _text_state_dict(load_weights_file(pretrained))
        elif self.cfg.arch is not None and not any(s in pretrained for s in "/\\."):
            import open_clip

            clip = open_clip.create_model(self.cfg.arch, pretrained=pretrained)
            state = _text_state_dict(clip.state_dict())
        else:
            raise FileNotFoundError(
                f"text_encoder.pretrained: '{pretrained}' is neither a weights file nor an open_clip pretrained tag"
            )
        # The causal mask is rebuilt by the tower; checkpoints may or may not carry it.
        state.pop("attn_mask", None)
        load_state_dict_checked(self.tower, state, what=f"text encoder weights {pretrained}")

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode whatever its parent does.
        return super().train(mode and self.cfg.trainable)

    @functools.lru_cache(maxsize=65536)
    def _encode_ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """BPE token ids (B, context_length), start and end tokens included, padded with pad_id and truncated."""
        L = self.context_length
        tok = self.tokenizer
        out = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        for i, text in enumerate(prompts):
            ids = [tok.sot_token_id, *self._encode_ids(text), tok.eot_token_id]
            if len(ids) > L:
                if not self._warned_truncation:
                    warnings.warn(f"caption longer than the text encoder's {L} tokens, truncated: {text[:60]!r}...")
                    self._warned_truncation = True
                ids = ids[: L - 1] + [tok.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L) -> hidden states (B, L, width) and pooled embedding (B, embed_dim)."""
        tower = self.tower
        x, attn_mask = tower._embeds(tokens)  # (B, L, width)
        blocks = tower.transformer.resblocks
        stop = len(blocks) - 1 if self.cfg.layer == "penultimate" else len(blocks)
        for i, block in enumerate(blocks):
            if i == stop:
                penultimate = x
            x = block(x, attn_mask=attn_mask)
        # Like SD v2, the penultimate layer's states also go through the final LayerNorm.
        hidden = tower.ln_final(penultimate if self.cfg.layer == "penultimate" else x)
        final = tower.ln_final(x)
        pooled = final[torch.arange(final.shape[0], device=final.device), tokens.argmax(dim=-1)]  # end-of-text token
        if tower.text_projection is not None:
            proj = tower.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return hidden, pooled

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> per-token hidden states (B, L, width) on this module's device."""
        device = self.tower.positional_embedding.device
        return self(self.tokenize(list(prompts)).to(device))[0]
