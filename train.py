"""Train a text-to-image latent diffusion model in one command: the VAE on the images, then the U-Net on its latents.

    python train.py --config configs/tiny.yaml [key=value ...]
    python train.py --config configs/tiny.yaml --stage vae|ldm|all     # default: all
    python train.py --config ... --resume       # continue from the latest valid checkpoint
    python train.py --config ... --overwrite    # start over in an output_dir that already holds a run
    accelerate launch train.py --config ...     # or: torchrun --nproc_per_node N train.py --config ...

Stage 1 (vae) trains the autoencoder: L1/L2 reconstruction + KL, and a PatchGAN term from
vae_training.disc_start on. It then sets the latent scale to 1/std(z) (LDM's scale_by_std) and
exports output_dir/vae/. It is skipped when vae_training.pretrained names a VAE.
Stage 2 (ldm) trains the U-Net (and the text encoder when text_encoder.trainable) by ε- or v-prediction
on the frozen VAE's latents, and exports output_dir/model/: the folder sample.py and app.py load.

    output_dir/
      config.yaml                   the resolved config
      metrics.jsonl                 one JSON line per logged step: stage, step, loss, lr, images/s, ...
      vae/                          vae.yaml (with the latent scale) + vae.safetensors
      vae/checkpoints/step-XXXXXX/  vae, discriminator, state.pt, meta.json
      vae/samples/step-XXXXXX.png   held-back images above their reconstructions
      checkpoints/step-XXXXXX/      a loadable pipeline (EMA U-Net) + unet_train.safetensors, state.pt, meta.json
      samples/step-XXXXXX.png       the validation prompts, sampled with the EMA weights
      cache/                        latents and text embeddings (memory-mapped), keyed on the images' bytes and the encoders' weights
      model/                        the exported pipeline (EMA U-Net)
      tensorboard/                  with training.tensorboard

The work is in diffusion/train/ (run.py sets up, loop.py is the loop both stages share, vae_stage.py and
ldm_stage.py are the stages). Exit status: 0 when done, or stopped by SIGINT/SIGTERM after saving a
checkpoint; 1 for a problem at run time (data, weights, a non-finite loss); 2 for a bad command line or config.
"""

from __future__ import annotations

import sys

from diffusion.cli import ArgumentParser, run_main
from diffusion.train.run import train


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description="Train the VAE, then the latent diffusion model.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--stage", choices=["vae", "ldm", "all"], default="all", help="default: all (VAE, then LDM)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint in output_dir")
    mode.add_argument("--overwrite", action="store_true", help="delete the previous run's outputs in output_dir first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.lr=2e-4")
    return p.parse_intermixed_args(argv)


def train_from_args(argv=None) -> None:
    args = parse_args(argv)
    train(args.config, args.overrides, args.stage, args.resume, args.overwrite)


def main(argv=None) -> int:
    return run_main(train_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
