"""Every sampler, by the name the AUTOMATIC1111 web UI gives it. Adding a sampler is one function plus one line here.

The config, the pipeline, `sample.py --sampler`, the app's list, the PNG infotext and the diffusers
export all read this table. A sampler is given by its web-UI name ("DPM++ 2M Karras") or its short
form ("dpmpp_2m_karras"), in any case; models store the short form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from . import samplers, sigma_samplers
from .errors import UsageError


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # the web UI's label, as the infotext writes it
    key: str  # the short form that configs and saved models use
    fn: Callable  # fn(model, x, alphas_cumprod, timesteps, *, generators, callback, **options) -> x0
    options: dict = field(default_factory=dict)
    default_steps: int = 20  # the app's default for this sampler
    uses_eta: bool = False  # DDIM's η (and its final ᾱ) apply
    diffusers: Optional[tuple[str, dict]] = None  # the diffusers scheduler class and config that samples alike


SAMPLERS = (
    SamplerSpec("DDIM", "ddim", samplers.ddim, default_steps=50, uses_eta=True, diffusers=("DDIMScheduler", {})),
    SamplerSpec("DDPM", "ddpm", samplers.ddpm, default_steps=50, diffusers=("DDPMScheduler", {})),
    SamplerSpec("Euler", "euler", sigma_samplers.euler, default_steps=30, diffusers=("EulerDiscreteScheduler", {})),
    SamplerSpec("Euler a", "euler_a", sigma_samplers.euler_ancestral, default_steps=30,
                diffusers=("EulerAncestralDiscreteScheduler", {})),
    SamplerSpec("DPM++ 2M", "dpmpp_2m", sigma_samplers.dpmpp_2m,
                diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})),
    SamplerSpec("DPM++ 2M Karras", "dpmpp_2m_karras", sigma_samplers.dpmpp_2m, {"karras": True},
                diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})),
    SamplerSpec("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras", sigma_samplers.dpmpp_2m_sde, {"karras": True},
                diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})),
)
_BY_NAME = {alias: s for s in SAMPLERS for alias in (s.name.lower(), s.key)}


def sampler(name: str) -> SamplerSpec:
    """The sampler a web-UI name or a short form names; UsageError listing the valid names otherwise."""
    spec = _BY_NAME.get(str(name).strip().lower())
    if spec is None:
        valid = ", ".join(f'"{s.name}" ({s.key})' for s in SAMPLERS)
        raise UsageError(f"unknown sampler {name!r}; choose one of {valid}")
    return spec


def from_diffusers(class_name: str, config: dict) -> Optional[SamplerSpec]:
    """The sampler that samples as a diffusers scheduler with this class and config would, or None."""
    for spec in SAMPLERS:
        if spec.diffusers and spec.diffusers[0] == class_name:
            if all(config.get(k, _DIFFUSERS_DEFAULTS.get(k)) == v for k, v in spec.diffusers[1].items()) and \
                    bool(config.get("use_karras_sigmas")) == bool(spec.options.get("karras")):
                return spec
    return None


_DIFFUSERS_DEFAULTS = {"algorithm_type": "dpmsolver++", "solver_order": 2}
