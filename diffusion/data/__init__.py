"""Training data: image-caption folders (indexing, loading, transforms) and the built-in shapes dataset.

Names are imported lazily, so that `python -m diffusion.data shapes` and the pixel evaluator, which
need only PIL and numpy, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "folder": [
        "CAPTION_EXTENSIONS",
        "IMAGE_EXTENSIONS",
        "DataError",
        "FolderIndex",
        "image_transform",
        "index_folder",
        "load_image",
        "to_rgb",
    ],
    "dataset": ["ImageCaptionDataset"],
    "shapes": [
        "COLORS",
        "POSITIONS",
        "SHAPES",
        "all_prompts",
        "caption",
        "ensure_shapes",
        "generate_shapes",
        "parse_caption",
    ],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from diffusion.data.dataset import ImageCaptionDataset
    from diffusion.data.folder import (
        CAPTION_EXTENSIONS,
        IMAGE_EXTENSIONS,
        DataError,
        FolderIndex,
        image_transform,
        index_folder,
        load_image,
        to_rgb,
    )
    from diffusion.data.shapes import (
        COLORS,
        POSITIONS,
        SHAPES,
        all_prompts,
        caption,
        ensure_shapes,
        generate_shapes,
        parse_caption,
    )


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
