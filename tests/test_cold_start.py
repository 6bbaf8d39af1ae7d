"""sample.py's cold start (benchmarks/cold_start.py times it): the sampling path imports only what runs,
and open_clip's tokenizer, loaded without the open_clip package, gives open_clip's ids."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.data.shapes import all_prompts
from diffusion.models import openclip_files
from diffusion.models.tokenizer import bundled_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Packages that nothing in sampling runs, and each costs seconds to import on a small CPU.
HEAVY = ("open_clip", "torchvision", "transformers", "timm", "diffusers", "accelerate", "gradio", "torch._dynamo")

CHILD = r"""
import json, sys
import sample
assert sample.main(sys.argv[1:]) == 0
from diffusion.models.text import _tokenizer
import diffusion.eval.fidelity, diffusion.eval.shapes  # what `python -m diffusion.eval shapes` adds
print(json.dumps({"modules": sorted(sys.modules), "tokenizer": type(_tokenizer(16)).__module__}))
"""


def test_sampling_imports_only_what_runs(tiny_model_dir, tmp_path):
    """A fresh interpreter that writes a PNG with sample.py has imported none of HEAVY."""
    argv = ["--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path)]
    child = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.splitlines()[-1])
    heavy = [m for m in result["modules"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"sampling imported {heavy[:5]}; import them where they run (openclip_files.py says why)"
    assert result["tokenizer"] == openclip_files.MODULE  # open_clip's tokenizer.py, run without its package
    assert len(list(tmp_path.glob("*.png"))) == 1


def prompts() -> list[str]:
    """Prompts where CLIP's cleaning and BPE have something to do, and random ones from a seeded mix of scripts."""
    hand = [
        "", " ", "a red circle in the top left", "A RED   Circle,\tTOP-left!\n", "don't you'll we've I'm it's",
        "fish &amp; chips &lt;3 &#39;quoted&#39;", "“curly quotes” and ‘single’ — dashes…", "cafÃ© mojibake Ã©",
        "café naïve Σίσυφος ΣΑΣ straße", "東京の猫 고양이 кошка قطة", "emoji 🐱🚀 👩‍👩‍👧 ✨", "1234567890 3.14 1,000,000",
        "<start_of_text> inside <end_of_text> text", "<|startoftext|>!<|endoftext|>", "under_score hy-phen a/b c\\d",
        "x" * 300, "word " * 100, "\u200b zero\u00a0width\u3000space", "ＦＵＬＬＷＩＤＴＨ ｆｏｒｍｓ", "ﬁ ligature ǅ title",
    ]
    pool = "abcxyzABCXYZ0159 \t\n,.!?'\"&;#-_/éüßñΣσςжЖ東京ひらがな한국🙂👍🏽&amp;’“”…\u0301"
    rng = random.Random(0)
    randoms = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    return hand + all_prompts(["red", "cyan", "purple"]) + randoms


def test_tokenizer_loaded_alone_matches_open_clip():
    """openclip_files.load_alone (the way sampling loads it) against `import open_clip.tokenizer`."""
    oc_tokenizer = pytest.importorskip("open_clip.tokenizer")
    alone = openclip_files.load_alone("tokenizer.py", "test_open_clip_tokenizer_alone")
    try:
        assert alone.SimpleTokenizer is not oc_tokenizer.SimpleTokenizer  # two modules, so the check means something
        ours, theirs = alone.SimpleTokenizer(context_length=77), oc_tokenizer.SimpleTokenizer()
        texts = prompts()
        for text in texts:
            assert ours.encode(text) == theirs.encode(text), text
        assert torch.equal(ours(texts), theirs(texts))  # start, end, padding and truncation to 77
        assert torch.equal(ours(texts, context_length=16), oc_tokenizer.tokenize(texts, context_length=16))
    finally:
        del sys.modules["test_open_clip_tokenizer_alone"]


def test_bundled_tokenizer_is_a_fresh_one_with_shared_tables():
    """bundled_tokenizer(n) borrows the tables of the tokenizer open_clip's module builds, and is SimpleTokenizer(context_length=n)."""
    module = openclip_files.tokenizer_module()
    shared, fresh = bundled_tokenizer(16), module.SimpleTokenizer(context_length=16)
    assert type(shared) is type(fresh) and shared.encoder is module._tokenizer.encoder
    assert shared.context_length == 16 and module._tokenizer.context_length == 77  # open_clip's own is unchanged
    for field in ("encoder", "decoder", "bpe_ranks", "byte_encoder", "vocab_size", "all_special_ids", "sot_token_id",
                  "eot_token_id", "clean_fn", "reduction_fn"):
        assert getattr(shared, field) == getattr(fresh, field), field
    assert shared.pat.pattern == fresh.pat.pattern and shared.pat.flags == fresh.pat.flags
    texts = prompts()[:60]
    assert torch.equal(shared(texts), fresh(texts))


def test_a_tokenizer_file_that_needs_its_package_is_not_loaded_alone(tmp_path, monkeypatch):
    """If open_clip's tokenizer.py ever imports from its own package, loading it alone fails cleanly, and
    tokenizer_module() falls back to `import open_clip.tokenizer`."""
    (tmp_path / "tokenizer.py").write_text("from .constants import OPENAI_DATASET_MEAN\n")
    monkeypatch.setattr(openclip_files, "package_dir", lambda: tmp_path)
    with pytest.raises(ImportError):
        openclip_files.load_alone("tokenizer.py", "test_tokenizer_needing_its_package")
    assert "test_tokenizer_needing_its_package" not in sys.modules
