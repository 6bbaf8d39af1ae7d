"""A trained VAE on its own: the folder that the VAE stage exports and `vae_training.pretrained` reads."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import TrainError
from .atomic import atomic_file
from .weights import load_state_dict_checked, load_weights_file, save_weights

VAE_CONFIG, VAE_WEIGHTS = "vae.yaml", "vae.safetensors"


def save_vae(vae: nn.Module, vae_cfg, folder: Path) -> None:
    """Write folder/vae.safetensors, then folder/vae.yaml (its config, with the latent scale) last: the
    config's presence marks a finished VAE."""
    from ..config import save_config

    folder.mkdir(parents=True, exist_ok=True)
    save_weights(vae, folder / VAE_WEIGHTS)
    with atomic_file(folder / VAE_CONFIG) as tmp:
        save_config(vae_cfg, tmp)


def load_vae(source: str | Path, default_cfg):
    """(VAEConfig, AutoencoderKL) from a pipeline folder, a VAE folder (vae.yaml) or a weights file.

    A weights file brings no config: its architecture and scale_factor come from `default_cfg` (vae.*).
    """
    from ..config import PipelineConfig, VAEConfig, from_dict, load_yaml
    from ..models.vae import AutoencoderKL
    from ..pipeline import CONFIG_FILE

    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        vae_cfg, weights = from_dict(PipelineConfig, load_yaml(path / CONFIG_FILE)).vae, path / "vae.safetensors"
    elif (path / VAE_CONFIG).is_file():
        vae_cfg, weights = from_dict(VAEConfig, load_yaml(path / VAE_CONFIG)), path / VAE_WEIGHTS
    elif path.is_file():
        vae_cfg, weights = default_cfg, path
    else:
        raise TrainError(f"no VAE at {path}: expected a model folder ({CONFIG_FILE}), a VAE folder ({VAE_CONFIG}) or a weights file")
    vae = AutoencoderKL(vae_cfg)
    load_state_dict_checked(vae, load_weights_file(weights), what=f"VAE weights {weights}")
    return vae_cfg, vae.requires_grad_(False).eval()
