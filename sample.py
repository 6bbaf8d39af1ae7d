"""Generate images from a saved model.

    python sample.py --model DIR --prompt "a red circle in the top left" [--num-images 4 --grid]
    python sample.py --model DIR --prompts-file prompts.txt      # one prompt per line
    python sample.py --from-png outputs/00003-45.png --model DIR  # regenerate an image from its metadata
    python sample.py --model DIR --prompt "a cyan circle" --lora cyan.safetensors:0.8   # with a LoRA adapter

All sampling happens in Pipeline.generate(), the same call the Gradio demo (app.py) makes. This
script only reads arguments, names files and writes PNGs carrying their parameters (A1111 infotext).

- Files are `<number>-<seed>.png`, numbered after the highest number already in --out, so names sort
  in generation order and nothing is overwritten. --grid adds `grid-<number>.png`.
- Image i uses seed + i, whatever --batch-size is. --seed -1 picks a random seed.
- Unset sampler, steps, guidance, eta and size take the defaults saved with the model.
- --from-png needs --model: a PNG records the model's name and hash, not its folder (folders move
  and get renamed). Flags given next to --from-png override the PNG's values. A model whose hash
  differs from the PNG's is reported, because the pixels will differ. The image is rebuilt in a
  batch of its recorded size and position (Pipeline.regenerate), so the pixels are the same ones.
- --compile compiles the U-Net and warms it up on the first batch's shape before generating
  (Pipeline.compile); --from-png is pixel-exact only in the mode (compiled or eager) that made the image.
- LoRA adapters: --lora FILE[:SCALE] (repeatable) and `<lora:name:m>` tags in the prompt, which are
  stripped from the text the encoder sees and looked up as NAME.safetensors in --lora-dir (as the web
  UI does). --from-png looks up the PNG's adapters there too; --lora flags replace them.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # A command, not an import: no garbage collections while the imports below make the ~190,000 objects
    # that live until exit (0.2-0.5 s on 2 cores). run_main freezes them and turns the collector back on.
    gc.disable()

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from diffusion.cli import (
    ArgumentParser, add_device_args, add_lora_args, add_model_args, compile_model, load_model, resolve_seed, run_main,
)
from diffusion import registry
from diffusion.errors import ToolkitError, UsageError, warn
from diffusion.infotext import JSON_KEY, GenerationParams, attach, read_png_params, save_png
from diffusion.lora.merge import describe, resolve_stack, split_prompt_tags
from diffusion.pipeline import image_grid

GENERATION_FLAGS = ("negative_prompt", "sampler", "steps", "guidance", "eta", "seed", "height", "width")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description="Generate images from a saved model folder.")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text prompt; an empty string generates unconditionally")
    source.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines are skipped)")
    source.add_argument("--from-png", help="regenerate from the parameters stored in this PNG")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none)")
    p.add_argument("--sampler", help='a web-UI name ("DPM++ 2M Karras") or its short form (dpmpp_2m_karras); default: the model\'s')
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (default: the model's)")
    p.add_argument("--eta", type=float, help="DDIM noise in [0, 1]; 0 is deterministic (default: the model's)")
    p.add_argument("--seed", type=int, help="image i uses seed + i; -1 picks a random seed (default: 0)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass; does not change the images")
    p.add_argument("--height", type=int, help="a multiple of the VAE factor (default: the model's resolution)")
    p.add_argument("--width", type=int, help="a multiple of the VAE factor (default: the model's resolution)")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write all images as one grid image")
    add_lora_args(p)
    add_device_args(p)
    return p.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ToolkitError(f"cannot read --prompts-file {path} ({e.__class__.__name__}); give a UTF-8 text file, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ToolkitError(f"--prompts-file {path} holds no prompts; write one prompt per line")
    return prompts


def read_png(path: str) -> GenerationParams:
    try:
        return read_png_params(path)
    except ValueError as e:
        raise ToolkitError(f"{e}; --from-png needs an image written by sample.py, app.py or AUTOMATIC1111") from None
    except OSError as e:
        raise ToolkitError(f"cannot read --from-png {path} ({e.__class__.__name__}); give a PNG file") from None


def request_from_args(args) -> tuple[list[str], dict, GenerationParams | None]:
    """The prompts and generate() keywords the flags ask for; --from-png values fill the unset flags."""
    stored = read_png(args.from_png) if args.from_png else None
    if args.from_png:
        prompts = [stored.prompt]
    elif args.prompts_file:
        prompts = read_prompts(args.prompts_file)
    else:
        prompts = [args.prompt]
    kwargs = {name: getattr(args, name) for name in GENERATION_FLAGS}
    if stored is not None:
        kwargs = {name: getattr(stored, name) if value is None else value for name, value in kwargs.items()}
    kwargs["negative_prompt"] = kwargs["negative_prompt"] or ""
    return prompts, kwargs, stored


def adapters_from_args(args, prompts: list[str], stored: GenerationParams | None) -> tuple[list[str], list]:
    """The prompts without their <lora:...> tags, and the adapters that flags, tags or the PNG ask for."""
    prompts, tags = split_prompt_tags(prompts, "--prompts-file" if args.prompts_file else "--prompt")
    recorded = stored.loras if stored is not None else ()
    return prompts, resolve_stack(args.lora, tags, args.lora_dir, recorded, recorded_from=args.from_png or "the image")


def next_number(folder: Path, prefix: str = "") -> int:
    """One more than the highest `<prefix><number>-...` / `<prefix><number>.png` name in folder."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)[-.]")
    numbers = [int(m.group(1)) for f in folder.iterdir() if (m := pattern.match(f.name))]
    return max(numbers, default=-1) + 1


def save_images(images: list[Image.Image], out: Path, grid: bool) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolkitError(f"cannot create --out {out} ({e.__class__.__name__}); choose another folder") from None
    params = [GenerationParams.from_json(image.info[JSON_KEY]) for image in images]
    paths = []
    for n, (image, p) in enumerate(zip(images, params), start=next_number(out)):
        paths.append(out / f"{n:05d}-{p.seed}.png")
        save_png(image, paths[-1])
    if grid:
        sheet = attach(image_grid(images, cols=math.ceil(math.sqrt(len(images)))), params[0])  # like A1111, the grid carries the first image's parameters
        paths.append(out / f"grid-{next_number(out, 'grid-'):05d}.png")
        save_png(sheet, paths[-1])
    return paths


def generate_files(argv: list[str] | None = None) -> list[Path]:
    """What `sample.py ARGS` does: returns the paths written. Problems raise ToolkitError (see run_main)."""
    args = parse_args(argv)
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.sampler is not None:
        registry.sampler(args.sampler)  # an unknown name is a bad command line, found before loading anything
    prompts, kwargs, stored = request_from_args(args)
    if not args.model:
        recorded = f" (it records model '{stored.model_name}', hash {stored.model_hash or 'unknown'})" if stored else ""
        raise UsageError(f"--model DIR is required{recorded}; point it at the model folder")
    prompts, stack = adapters_from_args(args, prompts, stored)  # read before the model: a bad file costs no load
    kwargs["seed"] = resolve_seed(0 if kwargs["seed"] is None else kwargs["seed"], len(prompts) * args.num_images)
    if args.seed == -1:
        print(f"random seed: {kwargs['seed']}", file=sys.stderr)

    pipe = load_model(args.model, args.device, args.dtype, args.prediction_type, args.ema)
    if stored is not None and stored.model_hash and stored.model_hash != pipe.model_hash:
        warn(f"{args.from_png} was made by model hash {stored.model_hash}, but {args.model} is {pipe.model_hash}; the pixels will differ")
    pipe.set_loras(stack)  # a LoRA made for another base model is refused here, naming its first misfit layer
    if stack:
        print(describe(pipe, stack), file=sys.stderr)
    regenerating = stored is not None and args.num_images == 1  # one image, rebuilt in its recorded batch for the same pixels
    if args.compile:
        first_batch = stored.batch_size if regenerating else min(args.batch_size, len(prompts) * args.num_images)
        compile_model(pipe, first_batch, **{k: kwargs[k] for k in ("sampler", "guidance", "height", "width")})

    bars: list[tqdm] = []  # made at the first step, so that a rejected argument prints no empty bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        if regenerating:
            images = [pipe.regenerate(dataclasses.replace(stored, **kwargs), progress=progress)]
        else:
            images = pipe.generate(
                [p for p in prompts for _ in range(args.num_images)], batch_size=args.batch_size, progress=progress, **kwargs
            )
    finally:
        for bar in bars:
            bar.close()

    paths = save_images(images, Path(args.out), args.grid)
    for path in paths:
        print(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    return run_main(generate_files, argv)


if __name__ == "__main__":
    sys.exit(main())
