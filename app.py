"""A Gradio demo for a saved model.

    python app.py --model DIR [--host 127.0.0.1] [--port 7860] [--share]

The model is loaded once and shared by every request. Generation goes through Pipeline.generate(),
the same call sample.py makes, so an image downloaded here (a PNG with the `parameters` text chunk)
regenerates with `python sample.py --from-png IMAGE --model DIR`.

One request runs at a time (queue concurrency 1) and at most QUEUE_SIZE wait, so that several users
do not overload one device. Values outside these limits are rejected with a visible error:
steps 1..num_train_timesteps, guidance 0..MAX_GUIDANCE, 1..MAX_IMAGES images, and height and width
multiples of the VAE factor up to MAX_SIZE_RATIO x the model's resolution. Seed -1 is random.
An empty prompt is allowed: it generates unconditionally.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from diffusion.cli import ArgumentParser, add_device_args, add_model_args, load_model, resolve_seed, run_main
from diffusion import registry
from diffusion.errors import ToolkitError, UsageError
from diffusion.pipeline import Pipeline

if TYPE_CHECKING:
    import gradio as gr

MAX_IMAGES = 8
MAX_GUIDANCE = 30.0
MAX_SIZE_RATIO = 2
QUEUE_SIZE = 16
SAMPLERS = [(s.name, s.key) for s in registry.SAMPLERS]  # (label, value) pairs


def model_card(pipeline: Pipeline) -> str:
    info = pipeline.cfg.info
    lines = [
        f"**Model:** {info.name}",
        f"**Resolution:** {info.resolution}×{info.resolution}",
        f"**Trained on:** {info.trained_on or 'not recorded'}",
    ]
    if pipeline.model_hash:
        lines.append(f"**Hash:** {pipeline.model_hash}")
    return " · ".join(lines)


def generate_gallery(pipeline: Pipeline, prompt, negative_prompt, sampler, steps, guidance, eta, seed, num_images, height, width, progress):
    """One request: (gallery of (image, infotext), the seed used, all infotexts); bad values become a visible gr.Error."""
    try:
        seed = resolve_seed(int(seed), int(num_images))
        images = pipeline.generate(
            [prompt or ""] * int(num_images),
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


def build_demo(pipeline: Pipeline) -> gr.Blocks:
    """The demo's Blocks, with the queue set up; the caller launches it."""
    import gradio as gr  # here, not at the top: it takes seconds to import, which --help and a bad flag need not wait for
    cfg = pipeline.cfg
    f, res, d = pipeline.vae_factor, cfg.info.resolution, cfg.sampling
    max_side = max(res * MAX_SIZE_RATIO, f)

    def generate(prompt, negative_prompt, sampler, steps, guidance, eta, seed, num_images, height, width, progress=gr.Progress()):
        return generate_gallery(pipeline, prompt, negative_prompt, sampler, steps, guidance, eta, seed, num_images, height, width, progress)

    with gr.Blocks(title=f"{cfg.info.name} · text to image") as demo:
        gr.Markdown(f"## Text to image\n{model_card(pipeline)}")
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
                    num_images = gr.Slider(1, MAX_IMAGES, value=min(4, MAX_IMAGES), step=1, label="Number of images")
                with gr.Row():
                    height = gr.Slider(f, max_side, value=res, step=f, label=f"Height (multiple of {f})")
                    width = gr.Slider(f, max_side, value=res, step=f, label=f"Width (multiple of {f})")
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
            inputs=[prompt, negative, sampler, steps, guidance, eta, seed, num_images, height, width],
            outputs=[gallery, seed_used, params_text],
            api_name="generate",
            concurrency_limit=1,
        )
    return demo.queue(max_size=QUEUE_SIZE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="app.py", description="Serve a saved model as a Gradio demo.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the demo to your network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    add_device_args(p)
    return p.parse_args(argv)


def serve(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.model:
        raise UsageError("--model is required: our model folder, a diffusers folder, or an SD .safetensors file")
    pipeline = load_model(args.model, args.device, args.dtype, args.prediction_type, args.ema)
    build_demo(pipeline).launch(server_name=args.host, server_port=args.port, share=args.share)


def main(argv: list[str] | None = None) -> int:
    return run_main(serve, argv)


if __name__ == "__main__":
    sys.exit(main())
