"""A Gradio demo for a saved model.

    python app.py --model DIR [--lora-dir DIR] [--host 127.0.0.1] [--port 7860] [--share] [--compile]

The model is loaded once and shared by every request. Generation goes through Pipeline.generate(),
the same call sample.py makes, so an image downloaded here (a PNG with the `parameters` text chunk)
regenerates with `python sample.py --from-png IMAGE --model DIR`.

One request runs at a time (queue concurrency 1) and at most QUEUE_SIZE wait, so that several users
do not overload one device. Values outside these limits are rejected with a visible error:
steps 1..num_train_timesteps, guidance 0..MAX_GUIDANCE, 1..MAX_IMAGES images, and height and width
multiples of the VAE factor up to MAX_SIZE_RATIO x the model's resolution. Seed -1 is random.
An empty prompt is allowed: it generates unconditionally.

With --lora-dir, a picker lists its *.safetensors adapters with a multiplier slider, and `<lora:name:m>`
tags in the prompt are looked up there too (the web UI's syntax); the adapters are merged into the
shared model before each request (Pipeline.set_loras) and every image records them.

With --compile the U-Net is compiled and warmed up for DEFAULT_IMAGES images before the server
starts, so the first visitor does not wait for the compiler; other sizes compile once on first use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion.cli import ArgumentParser, add_device_args, add_model_args, compile_model, load_model, resolve_seed, run_main
from diffusion.lora.merge import resolve_stack, split_prompt_tags
from diffusion import registry
from diffusion.errors import ToolkitError, UsageError
from diffusion.pipeline import Pipeline

if TYPE_CHECKING:
    import gradio as gr

MAX_IMAGES = 8
DEFAULT_IMAGES = 4  # the number-of-images slider's start, and the batch that --compile warms up
MAX_GUIDANCE = 30.0
MAX_SIZE_RATIO = 2
QUEUE_SIZE = 16
SAMPLERS = [(s.name, s.key) for s in registry.SAMPLERS]  # (label, value) pairs
NO_LORA = "None"


def lora_choices(lora_dir: str | None) -> list[str]:
    """The adapter picker's entries: "None", then the stems of the *.safetensors in --lora-dir."""
    return [NO_LORA, *sorted(p.stem for p in Path(lora_dir).glob("*.safetensors"))] if lora_dir else [NO_LORA]


def model_card(pipeline: Pipeline) -> str:
    info = pipeline.cfg.info
    lines = [
        f"**Model:** {info.name}",
        f"**Resolution:** {info.resolution}×{info.resolution}",
        f"**Trained on:** {info.trained_on or 'not recorded'}",
    ]
    if pipeline.model_hash:
        lines.append(f"**Hash:** {pipeline.model_hash}")
    if pipeline.loras:  # the adapters the last request merged in
        lines.append("**LoRA:** " + ", ".join(f"{a.name} ×{a.multiplier:g} ({a.hash})" for a in pipeline.loras))
    return " · ".join(lines)


def generate_gallery(pipeline: Pipeline, prompt, negative_prompt, sampler, steps, guidance, eta, seed, num_images, height, width, progress,
                     lora=NO_LORA, lora_scale=1.0, lora_dir=None):
    """One request: (gallery of (image, infotext), the seed used, all infotexts); bad values become a visible gr.Error.

    The picked adapter and the prompt's <lora:name:m> tags are looked up in lora_dir and merged in first.
    """
    try:
        seed = resolve_seed(int(seed), int(num_images))
        [prompt], tags = split_prompt_tags([prompt or ""])
        picked = [(lora, float(lora_scale))] if lora and lora != NO_LORA else []
        pipeline.set_loras(resolve_stack(None, picked + tags, [lora_dir] if lora_dir else []))
        images = pipeline.generate(
            [prompt] * int(num_images),
            negative_prompt=negative_prompt or "",
            sampler=sampler,
            steps=int(steps),
            guidance=float(guidance),
            eta=float(eta),
            seed=seed,
            height=int(height),
            width=int(width),
            batch_size=MAX_IMAGES,
            progress=lambda done, total: progress((done, total), desc="Denoising", unit="steps"),
        )
    except ToolkitError as e:
        import gradio as gr

        raise gr.Error(str(e), title="Check the settings", print_exception=False) from None
    params = [image.info["parameters"] for image in images]
    return list(zip(images, params)), seed, "\n\n".join(params)


def build_demo(pipeline: Pipeline, lora_dir: str | None = None) -> gr.Blocks:
    """The demo's Blocks, with the queue set up; the caller launches it."""
    import gradio as gr  # here, not at the top: it takes seconds to import, which --help and a bad flag need not wait for
    cfg = pipeline.cfg
    f, res, d = pipeline.vae_factor, cfg.info.resolution, cfg.sampling
    max_side = max(res * MAX_SIZE_RATIO, f)

    def generate(prompt, negative_prompt, sampler, steps, guidance, eta, seed, num_images, height, width, lora, lora_scale,
                 progress=gr.Progress()):
        return generate_gallery(pipeline, prompt, negative_prompt, sampler, steps, guidance, eta, seed, num_images, height, width,
                                progress, lora, lora_scale, lora_dir)

    def card() -> str:
        return f"## Text to image\n{model_card(pipeline)}"

    with gr.Blocks(title=f"{cfg.info.name} · text to image") as demo:
        header = gr.Markdown(card())
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="empty generates unconditionally")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                button = gr.Button("Generate", variant="primary")
                if cfg.info.example_prompts:
                    gr.Examples([[p] for p in cfg.info.example_prompts], inputs=[prompt], label="Example prompts (from the training captions)")
                sampler = gr.Dropdown(SAMPLERS, value=registry.sampler(d.sampler).key, label="Sampler")
                steps = gr.Slider(1, cfg.schedule.num_train_timesteps, value=d.steps, step=1, label="Steps")
                guidance = gr.Slider(0.0, MAX_GUIDANCE, value=d.guidance, step=0.1, label="Guidance scale")
                eta = gr.Slider(0.0, 1.0, value=d.eta, step=0.05, label="Eta (DDIM noise; 0 is deterministic)")
                with gr.Row():
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, minimum=-1)
                    num_images = gr.Slider(1, MAX_IMAGES, value=DEFAULT_IMAGES, step=1, label="Number of images")
                with gr.Row():
                    height = gr.Slider(f, max_side, value=res, step=f, label=f"Height (multiple of {f})")
                    width = gr.Slider(f, max_side, value=res, step=f, label=f"Width (multiple of {f})")
                with gr.Row():  # hidden without --lora-dir: nothing to pick
                    lora = gr.Dropdown(lora_choices(lora_dir), value=NO_LORA, label=f"LoRA (from {lora_dir})", visible=bool(lora_dir))
                    lora_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA multiplier", visible=bool(lora_dir))
            with gr.Column():
                gallery = gr.Gallery(
                    label="Results", elem_id="results", format="png", columns=4, object_fit="contain",
                    buttons=["download", "download_all", "fullscreen"],
                )
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                params_text = gr.Textbox(label="Parameters", lines=4, interactive=False, buttons=["copy"])

        # Each sampler has its own sensible step count (DPM++ 20, Euler 30, DDIM 50), as in the web UI.
        sampler.change(lambda key: registry.sampler(key).default_steps, sampler, steps)
        gr.on(
            [button.click, prompt.submit],
            generate,
            inputs=[prompt, negative, sampler, steps, guidance, eta, seed, num_images, height, width, lora, lora_scale],
            outputs=[gallery, seed_used, params_text],
            api_name="generate",
            concurrency_limit=1,
        ).then(card, None, header, api_visibility="private")  # the card names the adapters now merged in
    return demo.queue(max_size=QUEUE_SIZE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="app.py", description="Serve a saved model as a Gradio demo.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the demo to your network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    p.add_argument("--lora-dir", metavar="DIR", help="a folder of LoRA .safetensors to pick from and to name in <lora:name:m> prompt tags")
    add_device_args(p)
    return p.parse_args(argv)


def serve(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.model:
        raise UsageError("--model is required: our model folder, a diffusers folder, or an SD .safetensors file")
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir} is not a folder; give the folder that holds the LoRA .safetensors files")
    pipeline = load_model(args.model, args.device, args.dtype, args.prediction_type, args.ema)
    if args.compile:  # before the server starts: the first visitor must not wait for the compiler
        compile_model(pipeline, DEFAULT_IMAGES)
    build_demo(pipeline, args.lora_dir).launch(server_name=args.host, server_port=args.port, share=args.share)


def main(argv: list[str] | None = None) -> int:
    return run_main(serve, argv)


if __name__ == "__main__":
    sys.exit(main())
