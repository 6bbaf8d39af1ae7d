"""CLIP's text transformer (Radford et al. 2021, sec. 2.4) in open_clip's layout, without importing open_clip.

open_clip's TextTransformer is in open_clip/transformer.py, which imports open_clip.utils, which
imports torchvision (and torchvision imports torch._dynamo): seconds of start-up for sample.py,
the app and the evaluator (benchmarks/README.md, "Cold start"). This is that class for every text
config that open_clip builds with its default attention block, and it is the same class in three ways
that tests/test_clip_text.py checks against open_clip's own:

- the same parameter names and shapes, so open_clip checkpoints, SD 2 single files and our saved
  models load unchanged;
- the same modules created in the same order, so a seed gives the same initial weights;
- the same operations in the same order, so the outputs are the same bits.

TextEncoder (text.py) runs the blocks itself, to stop at the penultimate layer and pool at the end
token; this module only builds the tower and embeds the tokens.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# open_clip's CLIPTextCfg fields that this tower builds as open_clip does.
BUILT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value", "no_causal_mask",
         "proj_type", "proj_bias", "act_kwargs", "norm_kwargs"}
# Fields about pooling and tokenizing: TextEncoder always pools at the end token and chooses its own tokenizer.
NOT_READ = {"pool_type", "eos_id", "pad_id", "output_tokens", "final_ln_after_pool", "hf_tokenizer_name",
            "tokenizer_mode", "tokenizer_kwargs"}


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input's dtype (open_clip.transformer.LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig_type)


class QuickGELU(nn.Module):
    """x·σ(1.702x), the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init_value: float | None, act_layer, norm_layer):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = norm_layer(width)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)), ("gelu", act_layer()), ("c_proj", nn.Linear(mlp_width, width)),
        ]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        h = self.ln_1(x)  # query, key and value are one tensor: MultiheadAttention's self-attention path
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, ls_init_value, act_layer, norm_layer):
        super().__init__()
        self.width, self.layers, self.mlp_width = width, layers, int(width * mlp_ratio)
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, act_layer, norm_layer) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, width) -> (B, L, width)."""
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class TextTransformer(nn.Module):
    """Token and position embeddings, causal transformer blocks, final LayerNorm and the pooled projection."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, ls_init_value: float | None = None, output_dim: int | None = 512,
                 no_causal_mask: bool = False, proj_type: str = "linear", proj_bias: bool = False,
                 act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.num_pos = self.context_length = context_length
        self.vocab_size, self.width, self.heads, self.output_dim = vocab_size, width, heads, output_dim
        # Created in open_clip's order: every module that draws initial weights draws them in the same sequence.
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, ls_init_value, act_layer, norm_layer)
        self.ln_final = norm_layer(width)
        if no_causal_mask:
            self.attn_mask = None
        else:
            # Additive mask: -inf above the diagonal, so token i attends to tokens 0..i.
            self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                                 persistent=False)
        if proj_type == "none" or not output_dim:
            self.text_projection = None
        elif proj_bias:
            self.text_projection = nn.Linear(width, output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's initialisation (CLIP's): normal weights scaled by width and depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5 if layers else 0.0  # no blocks, no output projections
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width**-0.5)

    def _embeds(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, L) -> the first block's input (B, L, width) and the attention mask (open_clip's name)."""
        # The tower's dtype; open_clip reads it off the first block, which a tower of no blocks lacks.
        cast_dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(text).to(cast_dtype)
        return x + self.positional_embedding[: text.shape[1]].to(cast_dtype), self.attn_mask


def build_text_tower(embed_dim: int, text_cfg: dict, quick_gelu: bool = False, what: str = "text_encoder") -> TextTransformer:
    """open_clip's _build_text_tower(embed_dim, text_cfg, quick_gelu) for the default attention block.

    Raises ValueError naming the first setting it cannot build (CoCa's class token, open_clip's custom blocks).
    """
    unsupported = [k for k, v in text_cfg.items() if k not in BUILT | NOT_READ and not k.startswith("hf_")
                   and v not in (None, False, "default")]
    if unsupported:
        raise ValueError(f"{what}: text_cfg.{unsupported[0]} = {text_cfg[unsupported[0]]!r} is not supported "
                         f"(the text tower builds open_clip's default attention block only)")
    built = {k: v for k, v in text_cfg.items() if k in BUILT and k not in ("act_kwargs", "norm_kwargs")}
    act_layer = QuickGELU if quick_gelu else nn.GELU
    if text_cfg.get("act_kwargs") is not None:
        act_layer = functools.partial(act_layer, **text_cfg["act_kwargs"])
    norm_layer = functools.partial(LayerNorm, **text_cfg["norm_kwargs"]) if text_cfg.get("norm_kwargs") else LayerNorm
    return TextTransformer(**built, output_dim=embed_dim, act_layer=act_layer, norm_layer=norm_layer)
