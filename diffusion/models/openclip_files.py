"""What the toolkit takes from open_clip, reached without running open_clip's package __init__.

`import open_clip`, or any `import open_clip.x`, runs open_clip/__init__.py first. That imports CoCa,
the Hugging Face text towers (transformers), timm, and through open_clip.utils torchvision and
torch._dynamo: 3 to 5 s on a 2-core CPU beyond torch's own import (benchmarks/README.md, "Cold
start of sample.py"), more than loading and sampling the quick-start model take. The toolkit needs
two things from open_clip, and neither needs any of that:

- The BPE tokenizer, open_clip/tokenizer.py. It imports only the standard library, ftfy, numpy,
  regex and torch, so `tokenizer_module()` runs that file by itself, the way the Python docs import a
  source file directly (importlib.util.spec_from_file_location), as the module `MODULE`. It is open_clip's
  own code over open_clip's own vocabulary file; tests/test_cold_start.py checks its ids against
  `open_clip.tokenizer` imported the usual way.
- The named architectures, open_clip/model_configs/NAME.json, read as open_clip.get_model_config reads them.

The text tower's code is the toolkit's own (clip_text.py), because open_clip/transformer.py imports
torchvision. If the package is imported already, its tokenizer module is used. Should a later
open_clip give tokenizer.py an import from its own package, a relative one fails when the file runs
alone and this falls back to `import open_clip.tokenizer`, an absolute one imports the package: either
way the ids stay open_clip's, and tests/test_cold_start.py fails on the slow imports.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

MODULE = "diffusion.models._open_clip_tokenizer"  # where open_clip/tokenizer.py runs when loaded alone


@functools.lru_cache(maxsize=None)
def package_dir() -> Path:
    """The folder of the installed open_clip package; finding it does not import it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed; pip install open-clip-torch")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=None)
def tokenizer_module() -> ModuleType:
    """open_clip/tokenizer.py as a module: open_clip's own if imported already, else the file run by itself."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    try:
        return load_alone("tokenizer.py", MODULE)
    except ImportError:  # it now imports from its own package: take the slow, ordinary way
        import open_clip.tokenizer

        return open_clip.tokenizer


def load_alone(file: str, name: str) -> ModuleType:
    """Run one of open_clip's source files as the module `name`, without its package (ImportError if it needs it)."""
    spec = importlib.util.spec_from_file_location(name, package_dir() / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def model_config(arch: str) -> dict | None:
    """open_clip.get_model_config(arch): the architecture's config (embed_dim, vision_cfg, text_cfg), or None."""
    if ":" in arch:  # "hf-hub:org/repo" and "local-dir:PATH" are resolved by open_clip itself
        import open_clip

        return open_clip.get_model_config(arch)
    path = package_dir() / "model_configs" / f"{arch}.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    # open_clip lists only the files that hold all three; the others are not architectures.
    return cfg if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")) else None
