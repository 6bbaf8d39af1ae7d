"""LoRA files: kohya's layout (the AUTOMATIC1111 web UI's and ComfyUI's) and diffusers/peft's.

    kohya          lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha
                   lora_te_text_model_encoder_layers_0_self_attn_q_proj...
    diffusers      unet.<path>.lora_A.weight / .lora_B.weight, text_encoder.<path>...; alpha in the
                   header's lora_adapter_metadata (peft's LoraConfig), else alpha = rank
    peft           base_model.model.<path>.lora_A.weight..., alpha in adapter_config.json beside it

Only safetensors are read or written: a pickled file could run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ToolkitError
from ..io.atomic import atomic_file
from .network import LoRA, LoRALayer
from .targets import Target

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PEFT_PREFIX = "base_model.model."
# A layer's tensors: kohya's, peft's, and the older names that diffusers' convert_state_dict_to_diffusers
# still writes (its training scripts save attention layers as .lora.down and text layers as .lora_linear_layer.down).
PARTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha",
}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")  # diffusers' attention-processor files
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: peft's LoraConfig as JSON


class LoRAError(ToolkitError, ValueError):
    """A LoRA file that cannot be read, or that does not fit the model it is applied to."""


def short_hash(path: str | Path) -> str:
    """The web UI's LoRA hash: SHA-256 of the file after its safetensors header, first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header_len)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def read_lora(path: str | Path) -> LoRA:
    """A LoRA file in either layout, its layers keyed as the file names them."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: only .safetensors LoRA files are read (a pickled file can run code); convert it first")
    try:
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise LoRAError(f"cannot read LoRA file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (truncated or corrupt?)") from None
    lora = lora_from_state(state, metadata, str(path), _peft_config(path))
    lora.name, lora.hash = path.stem, short_hash(path)
    return lora


def _peft_config(path: Path) -> dict:
    """peft's save_pretrained keeps alpha in adapter_config.json beside adapter_model.safetensors."""
    config = path.parent / "adapter_config.json"
    try:
        return json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError) as e:
        raise LoRAError(f"cannot read {config} ({e.__class__.__name__}); fix or remove it") from None


def lora_from_state(state: dict[str, torch.Tensor], metadata: dict[str, str], what: str, peft_config: dict | None = None) -> LoRA:
    """Group a LoRA state dict into layers; alpha from the file, else its metadata, else alpha = rank."""
    if not state:
        raise LoRAError(f"{what} holds no tensors")
    kohya = any(k.startswith("lora_") for k in state)  # lora_unet_, lora_te_ (and SDXL's lora_te1_, refused later)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer, part = _split_key(key, what)
        grouped.setdefault(layer, {})[part] = tensor
    alphas = _AlphaRule(metadata, peft_config or {}, what)
    layers = {}
    for layer, tensors in grouped.items():
        if "down" not in tensors or "up" not in tensors:
            missing = "down" if "down" not in tensors else "up"
            raise LoRAError(f"{what}: layer {layer} has no {missing} weight")
        down, up = tensors["down"].float(), tensors["up"].float()
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or up.shape[2:] not in ((), (1, 1)):
            raise LoRAError(f"{what}: layer {layer} has down {tuple(down.shape)} and up {tuple(up.shape)}, which do not form B·A")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else alphas.alpha(layer, down.shape[0])
        layers[layer] = LoRALayer(down, up, alpha)
    return LoRA(layers, "kohya" if kohya else "peft", dict(metadata))


def _split_key(key: str, what: str) -> tuple[str, str]:
    """(layer, "down" | "up" | "alpha") of a tensor name."""
    for suffix, part in PARTS.items():
        if key.endswith("." + suffix):
            layer = key[: -len(suffix) - 1]
            return _PROCESSOR.sub(lambda m: "." + m[1] + (".0" if m[1] == "to_out" else ""), layer), part
    if re.search(r"(hada_|lokr_|lora_magnitude_vector|\.dora_scale)", key):
        raise LoRAError(f"{what}: {key} belongs to a LyCORIS/DoRA adapter, which is not supported (only LoRA and LoCon)")
    raise LoRAError(f"{what}: {key} is not a LoRA tensor (expected lora_down/lora_up, lora_A/lora_B or alpha)")


class _AlphaRule:
    """peft's alpha for a layer: alpha_pattern, else lora_alpha, else the rank (scale 1)."""

    def __init__(self, metadata: dict[str, str], peft_config: dict, what: str):
        self.configs: dict[str, dict] = {}
        if METADATA_KEY in metadata:
            try:
                packed = json.loads(metadata[METADATA_KEY])
            except ValueError:
                raise LoRAError(f"{what}: its {METADATA_KEY} header is not JSON") from None
            for key, value in packed.items():  # {"unet.lora_alpha": 8, "text_encoder.r": 4, ...}
                component, _, name = key.partition(".")
                self.configs.setdefault(component, {})[name] = value
        if peft_config:
            self.configs[""] = peft_config

    def alpha(self, layer: str, rank: int) -> float:
        component = layer.split(".", 1)[0] if layer.split(".", 1)[0] in self.configs else ""
        config = self.configs.get(component)
        if not config:
            return float(rank)
        alpha = float(config.get("lora_alpha") or rank)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", layer):
                alpha = float(value)
                break
        # rsLoRA (Kalajdzievski 2023) scales by alpha/√rank: the alpha that gives that scale as alpha/rank
        return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _keys(t: Target, layout: str) -> list[str]:
    """The names a file of `layout` may give target t."""
    if layout == "kohya":
        return [KOHYA_PREFIX[t.component] + t.name.replace(".", "_")]
    names = [t.name]
    if t.component == "text_encoder" and t.name.startswith("text_model."):
        names.append(t.name[len("text_model."):])  # transformers 5 dropped CLIPTextModel's text_model wrapper
    return [prefix + n for n in names for prefix in (f"{t.component}.", PEFT_PREFIX)]


def match(lora: LoRA, targets: list[Target], what: str) -> dict[Target, LoRALayer]:
    """Each file layer's target, with its shape checked; any layer that matches nothing is refused by name."""
    by_key = {key: t for t in targets for key in _keys(t, lora.layout)}
    unmatched = [k for k in lora.layers if k not in by_key]
    if unmatched:
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise LoRAError(f"{what}: layer {unmatched[0]} matches no layer of this model{more}; was the adapter made for another base model?")
    matched = {}
    for key, layer in lora.layers.items():
        t = by_key[key]
        out, fan_in = t.shape[0], int(torch.Size(t.shape[1:]).numel())
        if layer.up.shape[0] != out or layer.down.flatten(1).shape[1] != fan_in or (layer.down.ndim == 4) != (len(t.shape) == 4):
            raise LoRAError(f"{what}: layer {key} has down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)}, "
                            f"but the model's layer is {t.shape}; was the adapter made for another base model?")
        matched[t] = layer
    return matched


def count_by_component(matched: dict[Target, LoRALayer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in matched:
        counts[t.component] = counts.get(t.component, 0) + 1
    return counts


def kohya_state(layers: dict[Target, LoRALayer]) -> dict[str, torch.Tensor]:
    """kohya's tensors, each layer with its own .alpha (a file without one would mean alpha = rank)."""
    state = {}
    for t, layer in layers.items():
        key = KOHYA_PREFIX[t.component] + t.name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = layer.down.contiguous()
        state[f"{key}.lora_up.weight"] = layer.up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return state


def write_kohya(layers: dict[Target, LoRALayer], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a kohya-layout file atomically, with kohya's ss_* metadata as the web UIs show it."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in kohya_state(layers).items()}, str(tmp), metadata=metadata)


def kohya_metadata(rank: int, alpha: float, groups: tuple[str, ...], base_name: str, base_hash: str, **extra: str) -> dict[str, str]:
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"targets": list(groups)}),
        "ss_sd_model_name": base_name,
        "ss_sd_model_hash": base_hash,
        **extra,
    }
