"""Generation parameters, written into PNGs the way AUTOMATIC1111's web UI does ("infotext").

The PNG tEXt chunk `parameters` holds:

    <prompt>
    Negative prompt: <negative prompt>        (left out when empty)
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: ..., Model: ...

`Batch size` and `Batch pos` (as A1111 writes them, only for batches of more than one image) say
where the image sat in its batch: CPU convolutions are not bitwise batch-size invariant, so exact
regeneration rebuilds the same batch (see Pipeline.regenerate).

A value containing a comma, colon or newline is written as a JSON string. The same parameters are
also stored as JSON under the key `generation`, which is what we read back first.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import UsageError
from .registry import sampler as sampler_by_name

JSON_KEY = "generation"


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 7.5
    seed: int = 0
    height: int = 32
    width: int = 32
    eta: float = 0.0
    model_name: str = ""
    model_hash: str = ""
    batch_size: int = 1
    batch_pos: int = 0
    loras: tuple[tuple[str, float, str], ...] = ()  # (name, multiplier, short hash) of each adapter applied

    def to_infotext(self) -> str:
        pairs = {
            "Steps": self.steps,
            "Sampler": sampler_by_name(self.sampler).name,
            "CFG scale": self.guidance,
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
            "Eta": self.eta,
            "Batch size": self.batch_size if self.batch_size > 1 else "",
            "Batch pos": self.batch_pos if self.batch_size > 1 else "",
            "Lora hashes": ", ".join(f"{name}: {h}" for name, _, h in self.loras if h),
        }
        last = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v != "")
        # The web UI reads adapters from `<lora:name:multiplier>` tags in the prompt.
        lines = [self.prompt + "".join(f" <lora:{name}:{_number(m)}>" for name, m, _ in self.loras)]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        return "\n".join([*lines, last])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GenerationParams":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        data["loras"] = tuple((str(n), float(m), str(h)) for n, m, h in data.get("loras", ()))
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_infotext(cls, text: str) -> "GenerationParams":
        """Parse A1111 infotext. Raises ValueError when there is no parameter line."""
        lines = text.strip().split("\n")
        pairs = _parse_pairs(lines[-1]) if lines else {}
        # A1111 treats a line as parameters only when it holds at least 3 `Key: value` pairs.
        if len(pairs) < 3:
            raise ValueError("no generation parameters found (expected a 'Steps: ..., Sampler: ...' line)")
        body = lines[:-1]
        negative_at = next((i for i, ln in enumerate(body) if ln.startswith("Negative prompt:")), len(body))
        prompt, tags = split_lora_tags("\n".join(body[:negative_at]))
        hashes = dict(_lora_hash(entry) for entry in pairs.get("Lora hashes", "").split(",") if entry.strip())
        negative = "\n".join(body[negative_at:])[len("Negative prompt:"):].strip() if negative_at < len(body) else ""
        size = pairs.get("Size", "32x32")
        try:
            width, height = (int(v) for v in size.split("x"))
        except ValueError:  # not a number, or not two of them
            raise ValueError(f"'Size: {size}' in the PNG's parameters is not WIDTHxHEIGHT") from None
        sampler = _sampler_key(pairs)
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            steps=_field(pairs, "Steps", int, 50),
            sampler=sampler,
            guidance=_field(pairs, "CFG scale", float, 7.5),
            seed=_field(pairs, "Seed", int, 0),
            height=height,
            width=width,
            eta=_field(pairs, "Eta", float, 0.0),
            model_name=pairs.get("Model", ""),
            model_hash=pairs.get("Model hash", ""),
            batch_size=_field(pairs, "Batch size", int, 1),
            batch_pos=_field(pairs, "Batch pos", int, 0),
            loras=tuple((name, m, hashes.get(name, "")) for name, m in tags),
        )


# The web UI's extra-network tag: <lora:name> or <lora:name:multiplier>.
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?(?::[^>]*)?>")


# A run of tags with the spaces around it, removed as one.
_LORA_RUN = re.compile(r"[ \t]*(?:" + _LORA_TAG.pattern + r"[ \t]*)+")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """("a cat <lora:ink:0.8>") -> ("a cat", [("ink", 0.8)]): the prompt the text encoder sees, and the adapters.

    Only the tags and the spaces beside them go (a space stays between two words they separated): the
    rest of the prompt, its line breaks and spacing, is kept as written, so an infotext reads back the prompt.
    """
    tags = []
    for name, multiplier in _LORA_TAG.findall(prompt):
        try:
            tags.append((name.strip(), float(multiplier) if multiplier else 1.0))
        except ValueError:
            raise ValueError(f"<lora:{name}:{multiplier}> in the prompt: the multiplier must be a number") from None

    def gap(m: re.Match) -> str:
        before, after = m.string[: m.start()], m.string[m.end():]
        edge = not before or before.endswith("\n") or not after or after[0] in ",.;:!?)\n"
        return "" if edge else " "

    return _LORA_RUN.sub(gap, prompt) if tags else prompt, tags


def _number(value: float) -> str:
    """1.0 -> "1", 0.8 -> "0.8", and 1/3 in full: the shortest text that reads back as the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _lora_hash(entry: str) -> tuple[str, str]:
    name, _, h = entry.rpartition(":")
    return name.strip(), h.strip()


def _field(pairs: dict[str, str], key: str, kind: type, default):
    """kind(pairs[key]) or the default, with a message that names the field when it is not a number."""
    if key not in pairs:
        return default
    try:
        return kind(pairs[key])
    except ValueError:
        raise ValueError(f"'{key}: {pairs[key]}' in the PNG's parameters is not {'an integer' if kind is int else 'a number'}") from None


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


# `Key: value` where value is either a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([\w ][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_pairs(line: str) -> dict[str, str]:
    pairs = {}
    for key, value in _PAIR.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        pairs[key.strip()] = value
    return pairs


def attach(image: Image.Image, params: GenerationParams) -> Image.Image:
    """Record `params` in image.info, where save_png (and Gradio's PNG export) pick them up."""
    image.info["parameters"] = params.to_infotext()
    image.info[JSON_KEY] = params.to_json()
    return image


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write `image` as PNG, carrying the parameters that `attach` recorded as tEXt chunks."""
    meta = PngImagePlugin.PngInfo()
    for key in ("parameters", JSON_KEY):
        if key in image.info:
            meta.add_text(key, image.info[key])
    image.save(path, format="PNG", pnginfo=meta)


def read_png_params(path: str | Path) -> GenerationParams:
    """Read parameters back from a PNG we (or A1111) wrote. Raises ValueError when it has none."""
    with Image.open(path) as img:
        info = dict(img.info)
    if JSON_KEY in info:
        return GenerationParams.from_json(info[JSON_KEY])
    if "parameters" in info:
        return GenerationParams.from_infotext(info["parameters"])
    raise ValueError(f"{path} carries no generation parameters (no 'parameters' text chunk)")


def _sampler_key(pairs: dict) -> str:
    """The sampler of an infotext; newer web UIs write "Sampler: DPM++ 2M, Schedule type: Karras"."""
    name = pairs.get("Sampler", "DDIM")
    if pairs.get("Schedule type", "").lower() == "karras" and not name.lower().endswith("karras"):
        name += " Karras"
    try:
        return sampler_by_name(name).key
    except UsageError:
        raise ValueError(f"'Sampler: {name}' in the PNG's parameters is not a sampler here") from None
