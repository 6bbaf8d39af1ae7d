"""The LoRA stage: low-rank adapters (Hu et al. 2021) on a frozen model.pretrained, trained like the LDM stage.

Everything but the model is the LDM stage's: the loss, the data, the EMA (of the adapters), previews,
prompt fidelity, checkpoints, bit-exact resume and signals. Only the adapters' A and B get gradients
and optimizer state, and a checkpoint holds only them:

    checkpoints/step-000500/lora.safetensors        the EMA adapters, kohya's layout (loadable with --lora)
                            lora_train.safetensors  the raw adapters
                            state.pt
    output_dir/lora.safetensors                     the result, for sample.py --lora and the web UIs

peft, the field's library for this, wraps nn.Linear and nn.Conv2d modules. Our attention fuses q, k, v
(and CLIP's in_proj_weight is a bare parameter), and kohya's and diffusers' files adapt q, k and v
separately, so here each adapted weight gets a parametrization that adds the adapters of its row blocks
(lora.network.LowRank): the same update, on the weights as our modules hold them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import TrainError
from ..lora.files import LoRAError, kohya_metadata, lora_from_state, match, write_kohya
from ..lora.network import Adapters
from ..lora.targets import pipeline_targets, select
from ..pipeline import Pipeline
from .ldm_stage import LDMStage, build_pipeline
from .loop import Run

LORA_FILE = "lora.safetensors"


class LoRAStage(LDMStage):
    name, title = "lora", "LoRA"

    def build(self, run: Run) -> Pipeline:
        lc = run.cfg.lora
        pipe = build_pipeline(run)
        for module in (pipe.unet, pipe.text_encoder, pipe.vae):
            module.requires_grad_(False)
        self.targets = select(pipeline_targets(pipe), lc.targets)
        if not self.targets:
            raise TrainError(f"lora.targets {list(lc.targets)} names no layer of {run.cfg.model.pretrained}")
        self.alpha = float(lc.alpha if lc.alpha is not None else lc.rank)
        self.adapters = Adapters(pipe, self.targets, lc.rank, self.alpha, seed=run.cfg.seed)
        run.say(f"LoRA rank {lc.rank}, alpha {self.alpha:g}: {len(self.targets)} layers "
                f"({sum(p.numel() for p in self.adapters.parameters()):,} trained parameters)")
        return pipe

    @property
    def text_trains(self) -> bool:
        return "text_encoder" in self.adapters.components()

    @property
    def averaged(self) -> nn.Module:
        return self.adapters

    def param_groups(self) -> list[dict]:
        """The U-Net's adapters at training.lr and the text encoder's at training.text_encoder_lr."""
        tc = self.tc
        groups = []
        for component, lr in (("unet", tc.lr), ("text_encoder", tc.lr if tc.text_encoder_lr is None else tc.text_encoder_lr)):
            params = [p for part in self.adapters.parts.values() if part.targets[0].component == component
                      for p in part.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr})
        return groups

    def synced(self) -> dict:
        return {"weights": (self.adapters, "LoRA"), "ema": (self.ema.state_dict(), "EMA")}

    def metadata(self) -> dict[str, str]:
        cfg = self.run.cfg
        return kohya_metadata(cfg.lora.rank, self.alpha, cfg.lora.targets, Path(cfg.model.pretrained).name,
                              self.pipe.model_hash, ss_output_name=cfg.name)

    def restore(self, weights: dict, path: Path) -> None:
        what = f"checkpoint {path}"
        try:
            averaged = match(lora_from_state(weights["lora"], {}, what), self.targets, what)
            raw = match(lora_from_state(weights["lora_train"], {}, what), self.targets, what)
            self.adapters.load_layers(averaged, what)
            self.ema.load_state_dict({k: v.clone() for k, v in self.adapters.state_dict().items()})
            self.adapters.load_layers(raw, what)
        except (KeyError, LoRAError) as e:
            raise TrainError(f"{what} does not hold this run's adapters: {e}") from None

    def save(self, folder: Path) -> None:
        write_kohya(self.adapters.layers(), folder / "lora_train.safetensors", self.metadata())
        with self.ema.swapped_in(self.adapters):
            write_kohya(self.adapters.layers(), folder / LORA_FILE, self.metadata())

    def export(self, step: int) -> None:
        out = self.run.out / LORA_FILE
        with self.ema.swapped_in(self.adapters):
            write_kohya(self.adapters.layers(), out, self.metadata())
        size = out.stat().st_size / 2**20
        self.run.say(f"saved the adapter to {out} ({size:.2f} MiB); "
                     f"generate with sample.py --model {self.run.cfg.model.pretrained} --lora {out}")
