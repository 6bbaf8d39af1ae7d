"""Stable Diffusion text encoder weights and tokenizers in and out.

SD 1.x conditions on OpenAI's CLIP ViT-L/14 text model, kept in Hugging Face's CLIPTextModel layout
both in diffusers folders and in single files (under `cond_stage_model.transformer.`). SD 2.x
conditions on OpenCLIP ViT-H/14's text tower at its penultimate layer: single files keep the whole
tower in open_clip's own layout (under `cond_stage_model.model.`), diffusers folders a CLIPTextModel
of its first 23 blocks, whose last layer is that penultimate one.

Our layout ("native") is TextEncoder.state_dict(): open_clip's, under `tower.`. Hugging Face splits
the fused q, k, v projection in three and stores the pooled projection transposed; both are exact,
so round trips give back the same bits. Shapes tell width, depth, context, vocabulary and
projection, never how the width splits into heads: both SD towers have heads of 64 channels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import TextEncoderConfig
from ..models.text import TextEncoder
from ..models.tokenizer import FolderTokenizer
from .sd_keymap import PLAIN, Link, Table, check_shape, count_indices, expand, from_native, native_shapes, require, to_native
from .weights import WeightsError, load_weights_file, save_weights

TOWER = "tower."
BLOCKS = TOWER + "transformer.resblocks."
PROJECTION = TOWER + "text_projection"
HF_PREFIX = "text_model."  # transformers 4.x writes it on CLIPTextModel keys, 5.x does not
HF_PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's, never prefixed
# In a single file: SD 1's text model in Hugging Face's layout, SD 2's in open_clip's.
SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
SD1_PAD = 49407  # <|endoftext|>; SD 2 pads with "!", id 0
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's special tokens as Hugging Face names them

HF_WHAT, OPENCLIP_WHAT, NATIVE_WHAT = "Hugging Face CLIP text weights", "OpenCLIP text weights", "text encoder weights"
BLOCK_HF: Table = {
    "ln_1": ("layer_norm1",), "attn.out_proj": ("self_attn.out_proj",),
    "ln_2": ("layer_norm2",), "mlp.c_fc": ("mlp.fc1",), "mlp.c_proj": ("mlp.fc2",),
}


@dataclass(frozen=True)
class TextArch:
    """What a text tower's tensor shapes say about it."""

    width: int
    layers: int
    context_length: int
    vocab_size: int
    embed_dim: int  # the pooled embedding's projection; 0: none

    def config(self, head_width: int = 64, heads: int | None = None, **fields) -> TextEncoderConfig:
        """Our config for this tower: `heads` heads, else heads head_width wide."""
        heads = heads or self.width // head_width
        if heads < 1 or self.width % heads:
            raise WeightsError(f"a text tower {self.width} wide cannot have {heads} heads")
        return TextEncoderConfig(width=self.width, layers=self.layers, heads=heads, context_length=self.context_length,
                                 vocab_size=self.vocab_size, embed_dim=self.embed_dim, **fields)


def _matrix(state: dict[str, torch.Tensor], key: str, what: str) -> tuple[int, int]:
    shape = tuple(require(state, key, what).shape)
    if len(shape) != 2:
        raise WeightsError(f"{what}: tensor {key} has shape {shape}, expected a matrix")
    return shape


def hf_arch(state: dict[str, torch.Tensor], what: str = HF_WHAT) -> TextArch:
    """The architecture of Hugging Face CLIPTextModel(WithProjection) weights."""
    prefix = _hf_prefix(state)
    vocab, width = _matrix(state, prefix + "embeddings.token_embedding.weight", what)
    context = _matrix(state, prefix + "embeddings.position_embedding.weight", what)[0]
    embed_dim = _matrix(state, HF_PROJECTION, what)[0] if HF_PROJECTION in state else 0
    return TextArch(width, count_indices(state, prefix + "encoder.layers."), context, vocab, embed_dim)


def openclip_arch(state: dict[str, torch.Tensor], prefix: str = "", what: str = OPENCLIP_WHAT) -> TextArch:
    """The architecture of an open_clip text tower's weights (ours with prefix `tower.`)."""
    vocab, width = _matrix(state, prefix + "token_embedding.weight", what)
    context = _matrix(state, prefix + "positional_embedding", what)[0]
    embed_dim = _matrix(state, prefix + "text_projection", what)[1] if prefix + "text_projection" in state else 0
    return TextArch(width, count_indices(state, prefix + "transformer.resblocks."), context, vocab, embed_dim)


def native_arch(native: dict[str, torch.Tensor]) -> TextArch:
    return openclip_arch(native, TOWER, NATIVE_WHAT)


def _native_shapes(arch: TextArch) -> dict[str, tuple[int, ...]]:
    # Shapes do not depend on how the width splits into heads, so one head always fits.
    cfg = TextEncoderConfig(width=arch.width, layers=arch.layers, heads=1, context_length=arch.context_length,
                            vocab_size=arch.vocab_size, embed_dim=arch.embed_dim)
    return native_shapes(lambda: TextEncoder(cfg))


def _hf_prefix(state: dict[str, torch.Tensor]) -> str:
    return HF_PREFIX if any(k.startswith(HF_PREFIX) for k in state) else ""


def hf_links(shapes: dict[str, tuple[int, ...]], layers: int, prefix: str) -> list[Link]:
    """Where each of our tensors is in Hugging Face's layout; the projection, transposed, aside."""
    links = [Link(TOWER + "positional_embedding", (prefix + "embeddings.position_embedding.weight",))]
    links += expand(shapes, TOWER + "token_embedding", prefix + "embeddings.token_embedding", PLAIN)
    links += expand(shapes, TOWER + "ln_final", prefix + "final_layer_norm", PLAIN)
    for i in range(layers):
        ours, theirs = f"{BLOCKS}{i}", f"{prefix}encoder.layers.{i}"
        links += expand(shapes, ours, theirs, BLOCK_HF)
        for param in ("weight", "bias"):
            qkv = tuple(f"{theirs}.self_attn.{x}_proj.{param}" for x in "qkv")
            links.append(Link(f"{ours}.attn.in_proj_{param}", qkv))
    return links


def native_from_hf(state: dict[str, torch.Tensor], what: str = HF_WHAT) -> dict[str, torch.Tensor]:
    """Our weights from Hugging Face CLIPTextModel(WithProjection) weights, `text_model.` prefixed or not."""
    prefix = _hf_prefix(state)
    # Position ids are an index buffer, not weights; older checkpoints carry them.
    state = {k: v for k, v in state.items() if k != prefix + "embeddings.position_ids"}
    arch = hf_arch(state, what)
    shapes = _native_shapes(arch)
    body = {k: v for k, v in state.items() if k != HF_PROJECTION}
    native = to_native(body, hf_links(shapes, arch.layers, prefix), shapes, what)
    if arch.embed_dim:
        check_shape(HF_PROJECTION, state[HF_PROJECTION], (arch.embed_dim, arch.width), what)
        native[PROJECTION] = state[HF_PROJECTION].t().contiguous()
    return native


def hf_from_native(native: dict[str, torch.Tensor], prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPTextModel weights (WithProjection when ours project); transformers 4.x and 5.x
    both read the `text_model.` prefix."""
    arch = native_arch(native)
    shapes = _native_shapes(arch)
    hf = from_native(native, hf_links(shapes, arch.layers, prefix), shapes, NATIVE_WHAT)
    if arch.embed_dim:
        hf[HF_PROJECTION] = native[PROJECTION].t().contiguous()
    return hf


def _openclip_links(shapes: dict[str, tuple[int, ...]]) -> list[Link]:
    return [Link(key, (key[len(TOWER):],)) for key in shapes]


def native_from_openclip(state: dict[str, torch.Tensor], what: str = OPENCLIP_WHAT) -> dict[str, torch.Tensor]:
    """Our weights from an open_clip text tower's (SD 2's single-file layout): every block and the projection."""
    # The causal mask is rebuilt, and the contrastive temperature plays no part in conditioning.
    state = {k: v for k, v in state.items() if k not in ("attn_mask", "logit_scale")}
    shapes = _native_shapes(openclip_arch(state, what=what))
    return to_native(state, _openclip_links(shapes), shapes, what)


def openclip_from_native(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip text tower's weights from ours (without logit_scale, which ours do not hold)."""
    shapes = _native_shapes(native_arch(native))
    return from_native(native, _openclip_links(shapes), shapes, NATIVE_WHAT)


def penultimate_tower(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower without its last block and projection, as SD 2's diffusers folders hold it.

    Its last layer then ln_final is the whole tower's penultimate layer then ln_final, which SD 2
    conditions on; the projection served the last block's pooled embedding, so it goes too.
    """
    layers = native_arch(native).layers
    if layers < 2:
        raise WeightsError(f"{NATIVE_WHAT}: a tower of {layers} block has no penultimate layer")
    last = f"{BLOCKS}{layers - 1}."
    return {k: v for k, v in native.items() if not k.startswith(last) and k != PROJECTION}


# ----------------------------------------------------------------------------- single files


def is_sd_text_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` is an SD single-file checkpoint or Hugging Face CLIP text weights."""
    hf_key = "embeddings.token_embedding.weight"
    return any(k.startswith((SD1_PREFIX, SD2_PREFIX)) or k in (hf_key, HF_PREFIX + hf_key) for k in state)


def native_from_sd(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights from an SD single-file checkpoint or Hugging Face CLIP text weights."""
    if any(k.startswith((SD1_PREFIX, SD2_PREFIX)) for k in state):
        return _single_file_native(state)[1]
    return native_from_hf(state)


def _single_file_native(ckpt: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(the prefix it was under, our weights) of a single file's text encoder."""
    for prefix, to_ours in ((SD1_PREFIX, native_from_hf), (SD2_PREFIX, native_from_openclip)):
        state = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
        if state:
            return prefix, to_ours(state, f"text encoder under {prefix}")
    raise WeightsError(f"no text encoder in the checkpoint: no tensors under {SD1_PREFIX} or {SD2_PREFIX}")


def single_file_text(ckpt: dict[str, torch.Tensor], head_width: int = 64) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    """The config and weights of an SD single-file checkpoint's text encoder, computing SD's context.

    SD 1 (OpenAI CLIP, Hugging Face layout): quick_gelu, the last layer, padded with <|endoftext|>.
    SD 2 (OpenCLIP, open_clip layout): gelu, the penultimate layer, padded with "!". Single files
    carry no tokenizer; both use CLIP's vocabulary, which open_clip bundles.
    """
    prefix, native = _single_file_native(ckpt)
    if prefix == SD1_PREFIX:
        fields = dict(activation="quick_gelu", layer="last", pad_id=SD1_PAD)
    else:
        fields = dict(activation="gelu", layer="penultimate", pad_id=0)
    return native_arch(native).config(head_width, **fields), native


def single_file_from_native(native: dict[str, torch.Tensor], layout: Literal["sd1", "sd2"]) -> dict[str, torch.Tensor]:
    """Our weights as an SD single file holds them: SD 1's Hugging Face layout or SD 2's open_clip one."""
    if layout == "sd1":
        return {SD1_PREFIX + k: v for k, v in hf_from_native(native, HF_PREFIX).items()}
    return {SD2_PREFIX + k: v for k, v in openclip_from_native(native).items()}


# ----------------------------------------------------------------------------- diffusers folders


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def diffusers_text(root: str | Path) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    """The config and weights of a diffusers folder's text encoder (text_encoder/ and tokenizer/)."""
    folder = Path(root) / "text_encoder"
    config = _read_json(folder / "config.json")
    weights = folder / "model.safetensors"  # pickled weights are refused by the caller (sd_formats), never read
    if not weights.is_file():
        raise WeightsError(f"{folder}: no model.safetensors")
    native = native_from_hf(load_weights_file(weights), str(weights))
    activation = config.get("hidden_act")
    if activation not in ("gelu", "quick_gelu"):
        raise WeightsError(f"{folder / 'config.json'}: hidden_act {activation!r} is neither gelu nor quick_gelu")
    arch = native_arch(native)
    cfg = arch.config(heads=config.get("num_attention_heads"), activation=activation, layer="last",
                      tokenizer=str(Path(root) / "tokenizer"))
    return cfg, native


def hf_text_model(encoder: TextEncoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and weights of the transformers CLIPTextModel that computes this encoder's context."""
    native = {k: v.detach() for k, v in encoder.state_dict().items()}
    if encoder.cfg.layer == "penultimate":
        native = penultimate_tower(native)
    arch, tower = native_arch(native), encoder.tower
    config = {
        "architectures": ["CLIPTextModelWithProjection" if arch.embed_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.width,
        "intermediate_size": tower.transformer.mlp_width,
        "num_hidden_layers": arch.layers,
        "num_attention_heads": tower.heads,
        "max_position_embeddings": arch.context_length,
        "hidden_act": encoder.activation,
        "layer_norm_eps": tower.ln_final.eps,
        "projection_dim": arch.embed_dim or arch.width,
        "bos_token_id": encoder.tokenizer.sot_token_id,
        "eos_token_id": encoder.tokenizer.eot_token_id,
        "pad_token_id": encoder.pad_id,
    }
    return config, hf_from_native(native)


def save_diffusers_text(encoder: TextEncoder, root: str | Path) -> None:
    """Write text_encoder/ and tokenizer/ into a diffusers folder, as transformers reads them."""
    config, state = hf_text_model(encoder)
    folder = Path(root) / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights(state, folder / "model.safetensors")
    write_tokenizer(tokenizer_files(encoder), Path(root) / "tokenizer", encoder.context_length)


# ----------------------------------------------------------------------------- tokenizer folders


@dataclass
class TokenizerFiles:
    """A CLIP BPE tokenizer's tables and special tokens, as a Hugging Face folder holds them."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    bos: str = BOS
    eos: str = EOS
    pad: str = EOS  # CLIPTokenizer's default


def _merges(entries: list, path: Path) -> list[tuple[str, str]]:
    """Merge rules from merges.txt lines ("a b") or tokenizer.json entries ("a b" or ["a", "b"])."""
    merges = []
    for n, entry in enumerate(entries, 1):
        if isinstance(entry, str) and (entry.startswith("#version") or not entry):
            continue
        pair = tuple(entry.split(" ") if isinstance(entry, str) else entry)
        if len(pair) != 2:
            raise WeightsError(f"{path}: merge {n} is {entry!r}, not a pair of tokens")
        merges.append(pair)
    return merges


def _special_tokens(folder: Path, pad: str | None) -> dict[str, str]:
    """bos, eos and pad as transformers resolves them: special_tokens_map.json over tokenizer_config.json."""
    found = dict(bos=BOS, eos=EOS, pad=pad or EOS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            data = _read_json(folder / name)
            for key in found:
                value = data.get(key + "_token")
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    found[key] = value
    return found


def read_tokenizer(folder: str | Path) -> TokenizerFiles:
    """A tokenizer folder's vocabulary, merges and special tokens: vocab.json + merges.txt, or tokenizer.json."""
    folder, pad = Path(folder), None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        merges = _merges((folder / "merges.txt").read_text(encoding="utf-8").splitlines(), folder / "merges.txt")
    elif (folder / "tokenizer.json").is_file():
        data = _read_json(folder / "tokenizer.json")
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise WeightsError(f"{folder / 'tokenizer.json'}: a {model.get('type')} model, not CLIP's BPE")
        vocab = {**model.get("vocab", {}), **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
        merges = _merges(model.get("merges", []), folder / "tokenizer.json")
        pad = (data.get("padding") or {}).get("pad_token")
    else:
        raise WeightsError(f"{folder}: no tokenizer (vocab.json and merges.txt, or tokenizer.json)")
    special = _special_tokens(folder, pad)
    for name, token in special.items():
        if token not in vocab:
            raise WeightsError(f"{folder}: the {name} token {token!r} is not in the vocabulary")
    return TokenizerFiles(vocab, merges, **special)


def tokenizer_files(encoder: TextEncoder) -> TokenizerFiles:
    """The encoder's tokenizer as a Hugging Face folder's tables, padded as the encoder pads."""
    tok = encoder.tokenizer
    # open_clip's bundled vocabulary names its special tokens <start_of_text> and <end_of_text>.
    bos, eos = (tok.files.bos, tok.files.eos) if isinstance(tok, FolderTokenizer) else (BOS, EOS)
    names = {tok.sot_token_id: bos, tok.eot_token_id: eos}
    vocab = {names.get(i, t): i for t, i in tok.encoder.items()}
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    pad = next(t for t, i in vocab.items() if i == encoder.pad_id)
    return TokenizerFiles(vocab, merges, bos, eos, pad)


def write_tokenizer(files: TokenizerFiles, folder: str | Path, context_length: int) -> None:
    """vocab.json, merges.txt and the special tokens, as transformers' CLIPTokenizer reads them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(files.vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in files.merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": files.bos, "eos_token": files.eos, "unk_token": files.eos, "pad_token": files.pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
