"""Our CLIP text tower (diffusion/models/clip_text.py) against open_clip's TextTransformer, the oracle:
the same tensors by name and shape, the same initial weights from a seed, the same output bits."""

import pytest
import torch

from diffusion.config import ConfigError, TextEncoderConfig
from diffusion.models import openclip_files
from diffusion.models.clip_text import build_text_tower
from diffusion.models.text import TextEncoder

open_clip_model = pytest.importorskip("open_clip.model")

SMALL = dict(context_length=12, vocab_size=500, width=32, heads=4, layers=2)
# Each open_clip text setting that the tower builds, on a small tower: (embed_dim, text_cfg changes, quick_gelu).
VARIANTS = {
    "plain": (16, {}, False),
    "quick_gelu": (16, {}, True),
    "no_projection": (0, {}, False),
    "proj_none": (16, {"proj_type": "none"}, False),
    "proj_bias": (16, {"proj_bias": True}, False),
    "layer_scale": (16, {"ls_init_value": 0.1}, False),
    "no_causal_mask": (16, {"no_causal_mask": True}, False),
    "eps_tanh_ratio": (16, {"norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}, "mlp_ratio": 3.7362}, False),
    "pooling_settings": (16, {"pool_type": "last", "eos_id": 1, "output_tokens": True}, False),
}


def both_towers(embed_dim: int, text_cfg: dict, quick_gelu: bool):
    """(ours, open_clip's), each built right after torch.manual_seed(0); and the RNG states after each."""
    torch.manual_seed(0)
    ours = build_text_tower(embed_dim, text_cfg, quick_gelu)
    rng_ours = torch.get_rng_state()
    torch.manual_seed(0)
    theirs = open_clip_model._build_text_tower(embed_dim, text_cfg, quick_gelu)
    return ours, theirs, rng_ours, torch.get_rng_state()


def hidden(tower, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The path TextEncoder takes through a tower: embeddings, the blocks, the final LayerNorm, the projection."""
    x, attn_mask = tower._embeds(tokens)
    x = tower.ln_final(tower.transformer(x, attn_mask=attn_mask))
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    proj = tower.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    return x, pooled, attn_mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_tensors_and_initial_weights(variant):
    embed_dim, changes, quick_gelu = VARIANTS[variant]
    ours, theirs, rng_ours, rng_theirs = both_towers(embed_dim, {**SMALL, **changes}, quick_gelu)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name
    assert torch.equal(rng_ours, rng_theirs)  # the same draws, so training from a seed goes on alike
    assert (ours.attn_mask is None) == (theirs.attn_mask is None)
    if ours.attn_mask is not None:
        assert torch.equal(ours.attn_mask, theirs.attn_mask)
    assert (ours.context_length, ours.width, ours.heads, ours.vocab_size) == \
        (theirs.context_length, theirs.width, theirs.heads, theirs.vocab_size)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_bits(variant, dtype):
    embed_dim, changes, quick_gelu = VARIANTS[variant]
    ours, theirs, _, _ = both_towers(embed_dim, {**SMALL, **changes}, quick_gelu)
    ours.to(dtype).eval()
    theirs.to(dtype).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (3, SMALL["context_length"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # MultiheadAttention's fused inference path
        for a, b in zip(hidden(ours, tokens), hidden(theirs, tokens)):
            assert a is None and b is None or torch.equal(a, b)
    ours.train()
    theirs.train()
    x_ours, pooled_ours, _ = hidden(ours, tokens)  # the training path, with autograd
    x_theirs, pooled_theirs, _ = hidden(theirs, tokens)
    assert torch.equal(x_ours, x_theirs) and torch.equal(pooled_ours, pooled_theirs)
    (x_ours.float().square().mean() + pooled_ours.float().sum()).backward()
    (x_theirs.float().square().mean() + pooled_theirs.float().sum()).backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def test_text_encoder_matches_open_clip_tower():
    """The whole encoder, both layers, with open_clip's tower swapped in for ours."""
    for layer in ("last", "penultimate"):
        cfg = TextEncoderConfig(width=32, layers=3, heads=4, context_length=12, layer=layer, trainable=False)
        ours = TextEncoder(cfg)
        ref = TextEncoder(cfg)
        ref.tower = open_clip_model._build_text_tower(32, dict(SMALL, layers=3, vocab_size=49408), False)
        ref.tower.load_state_dict(ours.tower.state_dict())
        ref.tower.requires_grad_(False).eval()  # as TextEncoder leaves a frozen tower: MultiheadAttention's path depends on it
        tokens = ours.tokenize(["a red circle in the top left", "", "a blue square"])
        with torch.no_grad():
            for a, b in zip(ours(tokens), ref(tokens)):
                assert torch.equal(a, b)


def test_named_architectures_match_open_clip():
    """Every bundled architecture reads as open_clip reads it, and the SD towers have open_clip's tensors."""
    import open_clip

    names = open_clip.list_models()
    assert len(names) > 50
    for name in names:
        assert openclip_files.model_config(name) == open_clip.get_model_config(name), name
    assert openclip_files.model_config("ViT-Nope") is None
    # The towers SD 1 (ViT-L/14), SD 2 (ViT-H/14) and SDXL (ViT-bigG/14) use, and one with other settings.
    for name in ("ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ViT-B-16-SigLIP"):
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):
            ours = build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False))
            theirs = open_clip_model._build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False))
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}, name
    # What the tower does not build is refused by name; Hugging Face towers are refused before (text.py).
    with pytest.raises(ValueError, match="text_cfg.embed_cls = True is not supported"):
        build_text_tower(512, open_clip.get_model_config("coca_ViT-B-32")["text_cfg"])


def test_tower_of_no_blocks_keeps_each_word_to_itself():
    """layers=0 (the quick start's tower): each state is LayerNorm(token + position embedding), so a word's
    state is the same whatever the words around it, and the end token no longer sums up the caption."""
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(width=32, layers=0, heads=4, context_length=12, embed_dim=16))
    tower = encoder.tower
    tokens = encoder.tokenize(["a red circle in the top left", "a blue circle in the top left"])
    with torch.no_grad():
        states, pooled = encoder(tokens)
        expected = tower.ln_final(tower.token_embedding(tokens) + tower.positional_embedding)
    assert torch.equal(states, expected)
    differs = (states[0] - states[1]).abs().amax(-1) > 0  # (L,)
    assert differs.tolist() == [i == 2 for i in range(12)]  # only the color's own slot
    torch.testing.assert_close(pooled[0], pooled[1])  # the end token's state knows nothing of the color
    # Both rows in one product, as the tower projects them: one row alone may take another kernel and round
    # differently (it does on CPUs with AVX-512).
    assert torch.equal(pooled, states[torch.arange(2), tokens.argmax(-1)] @ tower.text_projection)
    assert len(list(tower.transformer.parameters())) == 0
    # A tower of no blocks has no penultimate layer; the module says so however its config was made.
    with pytest.raises(ConfigError, match="penultimate needs a tower of at least one block"):  # one line, as the CLIs print it
        TextEncoder(TextEncoderConfig(width=32, layers=0, heads=4, context_length=12, layer="penultimate"))
