"""Stable Diffusion text encoders in and out, against transformers' CLIPTextModel and CLIPTokenizer.

Tiny, randomly initialised towers of both flavours: SD 1 (OpenAI CLIP: quick_gelu, last layer,
padded with <|endoftext|>) and SD 2 (OpenCLIP: gelu, penultimate layer, padded with "!"). The
vocabulary is the real one (open_clip's bundled BPE, written out as a Hugging Face folder), so
that the tokenizers are compared on real prompts.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings

import pytest
import torch

from diffusion.config import TextEncoderConfig
from diffusion.io import sd_text
from diffusion.io.weights import WeightsError, load_state_dict_checked, save_weights
from diffusion.models.text import TextEncoder

transformers = pytest.importorskip("transformers")

EOS, PAD2 = "<|endoftext|>", "!"
PROMPTS = [
    "",
    "a red circle in the top left",
    "  A Photo\tof   a CAT\n",
    "fish &amp; chips, “quoted” – Straße, café, ΣΑΣ",
    "hello! wow?! <|endoftext|> emoji 🐱",
    "a very long prompt about many things " * 12,  # well over 77 tokens
]
SD1 = dict(act="quick_gelu", pad=EOS, layer="last")
SD2 = dict(act="gelu", pad=PAD2, layer="penultimate")


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value (LayerNorms start at 1 and 0), so that no mix-up hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def hf_model(act: str, layers: int = 2, width: int = 32, heads: int = 4, projection: int = 0, pad_id: int = 0):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection or width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    torch.manual_seed(layers)
    model = cls(config).eval()
    perturb(model, seed=layers + width)
    return model


@pytest.fixture(scope="module")
def clip_vocab() -> sd_text.TokenizerFiles:
    """open_clip's bundled CLIP vocabulary and merges, as a Hugging Face folder holds them."""
    return sd_text.tokenizer_files(TextEncoder(TextEncoderConfig(width=32, layers=1, heads=4)))


@pytest.fixture(scope="module")
def tokenizer_dirs(clip_vocab, tmp_path_factory) -> dict:
    """(pad token, files) -> folder: vocab.json + merges.txt, or a tokenizer.json as transformers saves it."""
    dirs = {}
    for pad in (EOS, PAD2):
        folder = tmp_path_factory.mktemp("vocab")
        sd_text.write_tokenizer(dataclasses.replace(clip_vocab, pad=pad), folder, 77)
        dirs[pad, "vocab"] = folder
        fast = tmp_path_factory.mktemp("fast")
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(fast)
        for name in ("vocab.json", "merges.txt"):
            (fast / name).unlink(missing_ok=True)
        assert (fast / "tokenizer.json").is_file()
        dirs[pad, "tokenizer.json"] = fast
    return dirs


def clip_ids(folder, prompts=PROMPTS) -> torch.Tensor:
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def our_ids(encoder: TextEncoder, prompts=PROMPTS) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt's truncation warning
        return encoder.tokenize(prompts)


def assert_bits_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- (a) diffusers folders


@pytest.mark.parametrize("files", ["vocab", "tokenizer.json"])
@pytest.mark.parametrize("flavour", [SD1, SD2], ids=["sd1", "sd2"])
def test_diffusers_folder_computes_what_transformers_computes(flavour, files, tokenizer_dirs, tmp_path):
    # SD 2's folder holds the tower without its last block, so its last layer is SD 2's penultimate.
    hf = hf_model(flavour["act"], layers=3 if flavour is SD1 else 2)
    hf.save_pretrained(tmp_path / "text_encoder")
    shutil.copytree(tokenizer_dirs[flavour["pad"], files], tmp_path / "tokenizer")
    cfg, native = sd_text.diffusers_text(tmp_path)
    assert (cfg.activation, cfg.layer, cfg.heads, cfg.embed_dim) == (flavour["act"], "last", 4, 0)
    encoder = TextEncoder(cfg)
    load_state_dict_checked(encoder, native, what="converted")

    ids = clip_ids(tmp_path / "tokenizer")
    assert torch.equal(our_ids(encoder), ids)
    assert encoder.pad_id == (49407 if flavour is SD1 else 0) and ids[0, 2:].eq(encoder.pad_id).all()
    with torch.no_grad():
        ours, theirs = encoder(ids)[0], hf(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # The same weights with the other activation compute something else: the check above has teeth.
    other = TextEncoder(dataclasses.replace(cfg, activation="gelu" if flavour is SD1 else "quick_gelu"))
    other.load_state_dict(encoder.state_dict())
    assert (other(ids)[0] - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("layers", [3, 0])  # 0: the quick start's tower of embeddings only
def test_export_to_diffusers_folder_round_trips(layers, tokenizer_dirs, tmp_path):
    cfg = TextEncoderConfig(width=32, layers=layers, heads=4, context_length=77, activation="quick_gelu",
                            embed_dim=16, tokenizer=str(tokenizer_dirs[EOS, "vocab"]))
    torch.manual_seed(0)
    encoder = TextEncoder(cfg)
    perturb(encoder, seed=1)
    sd_text.save_diffusers_text(encoder, tmp_path)
    hf = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").eval()
    ids = clip_ids(tmp_path / "tokenizer")
    assert torch.equal(our_ids(encoder), ids)
    with torch.no_grad():
        out = hf(ids)
        hidden, pooled = encoder(ids)
    torch.testing.assert_close(hidden, out.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=1e-5)
    cfg_back, native = sd_text.diffusers_text(tmp_path)
    assert_bits_equal(native, encoder.state_dict())
    assert (cfg_back.activation, cfg_back.embed_dim, TextEncoder(cfg_back).pad_id) == ("quick_gelu", 16, 49407)


# ----------------------------------------------------------------------------- (b) tokenizers


@pytest.mark.parametrize("files", ["vocab", "tokenizer.json"])
@pytest.mark.parametrize("pad", [EOS, PAD2])
def test_folder_tokenizer_gives_clip_tokenizer_ids(pad, files, tokenizer_dirs):
    folder = tokenizer_dirs[pad, files]
    encoder = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=4, tokenizer=str(folder)))
    ids, theirs = our_ids(encoder), clip_ids(folder)
    assert torch.equal(ids, theirs)
    assert encoder.pad_id == (49407 if pad == EOS else 0)
    long = ids[-1]
    assert (long[0], long[-1]) == (49406, 49407) and (long == 49407).sum() == 1  # truncated, end token kept
    if pad == PAD2:
        # transformers splits the pad token out of the text: "hello!" ends with id 0, not "!</w>".
        assert 0 in ids[4, : (ids[4] == 49407).nonzero()[0, 0]].tolist()


def test_bundled_tokenizer_matches_on_plain_prompts_only(tokenizer_dirs):
    """open_clip's own cleaning (ftfy, HTML unescaping) departs from CLIPTokenizer on some prompts."""
    bundled = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=4))  # pads with 0, as SD 2 does
    ids, theirs = our_ids(bundled), clip_ids(tokenizer_dirs[PAD2, "vocab"])
    plain = [0, 1, 2, 5]
    assert torch.equal(ids[plain], theirs[plain])
    assert not torch.equal(ids[3], theirs[3])  # "&amp;" and curly quotes


# ----------------------------------------------------------------------------- (c) OpenCLIP single files


def test_openclip_single_file_round_trips_and_matches_transformers(tokenizer_dirs):
    torch.manual_seed(0)
    cfg = TextEncoderConfig(width=32, layers=3, heads=4, context_length=77, activation="gelu",
                            layer="penultimate", embed_dim=16)
    encoder = TextEncoder(cfg)
    perturb(encoder, seed=2)
    native = encoder.state_dict()

    tower = sd_text.openclip_from_native(native)
    assert "transformer.resblocks.2.attn.in_proj_weight" in tower and tower["text_projection"].shape == (32, 16)
    assert_bits_equal(sd_text.native_from_openclip(tower), native)

    ckpt = sd_text.single_file_from_native(native, "sd2")
    ckpt.update({"cond_stage_model.model.logit_scale": torch.tensor(4.6), "model.diffusion_model.out.2.bias": torch.zeros(4)})
    loaded_cfg, loaded = sd_text.single_file_text(ckpt, head_width=8)
    assert_bits_equal(loaded, native)
    assert loaded_cfg == dataclasses.replace(cfg, pad_id=0)

    # The diffusers form: the first blocks only, in Hugging Face's layout, read at their last layer.
    hf = hf_model("gelu", layers=2)
    hf.load_state_dict(sd_text.hf_from_native(sd_text.penultimate_tower(native), prefix=""), strict=True)
    ids = clip_ids(tokenizer_dirs[PAD2, "vocab"])
    # Single files carry no tokenizer: the bundled vocabulary, padded with "!" as SD 2 pads.
    assert torch.equal(TextEncoder(loaded_cfg).tokenize(PROMPTS[:3]), ids[:3])
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids)[0], hf(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_sd1_single_file_round_trips_and_matches_transformers(tokenizer_dirs):
    hf = hf_model("quick_gelu")
    state = {"text_model." + k: v for k, v in hf.state_dict().items()}
    ckpt = {sd_text.SD1_PREFIX + k: v for k, v in state.items()}
    ckpt[sd_text.SD1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older files carry it
    cfg, native = sd_text.single_file_text(ckpt, head_width=8)
    assert (cfg.activation, cfg.layer, cfg.pad_id, cfg.tokenizer) == ("quick_gelu", "last", 49407, None)
    encoder = TextEncoder(cfg)
    load_state_dict_checked(encoder, native, what="converted")
    ids = clip_ids(tokenizer_dirs[EOS, "vocab"])
    assert torch.equal(encoder.tokenize(PROMPTS[:3]), ids[:3])  # the bundled vocabulary, padded with <|endoftext|>
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids)[0], hf(ids).last_hidden_state, rtol=0, atol=1e-5)
    back = sd_text.single_file_from_native(native, "sd1")
    assert_bits_equal(back, {k: v for k, v in ckpt.items() if not k.endswith("position_ids")})


@pytest.mark.parametrize("layout", ["hf", "sd1", "sd2"])
def test_pretrained_reads_sd_layouts(layout, tmp_path):
    if layout == "sd2":
        source = TextEncoder(TextEncoderConfig(width=32, layers=2, heads=4, context_length=77))
        state = sd_text.single_file_from_native(source.state_dict(), "sd2")
    else:
        source = TextEncoder(TextEncoderConfig(width=32, layers=2, heads=4, context_length=77, embed_dim=0))
        state = sd_text.hf_from_native(source.state_dict(), prefix="")
        state = {sd_text.SD1_PREFIX + "text_model." + k: v for k, v in state.items()} if layout == "sd1" else state
    save_weights(state, tmp_path / "weights.safetensors")
    loaded = TextEncoder(dataclasses.replace(source.cfg, pretrained=str(tmp_path / "weights.safetensors")))
    assert_bits_equal(loaded.state_dict(), source.state_dict())


# ----------------------------------------------------------------------------- (d) text_model. prefix


def test_text_model_prefix_is_optional():
    hf = hf_model("quick_gelu", projection=16)
    v4 = hf.state_dict()  # WithProjection keeps text_model. in transformers 5 as CLIPTextModel did in 4.x
    assert any(k.startswith("text_model.") for k in v4)
    v5 = {k.removeprefix("text_model."): v for k, v in v4.items()}
    v4 = {**v4, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    native = sd_text.native_from_hf(v4)
    assert_bits_equal(sd_text.native_from_hf(v5), native)
    assert native["tower.text_projection"].shape == (32, 16)
    assert_bits_equal(sd_text.hf_from_native(native, prefix=""), v5)
    arch = sd_text.hf_arch(v5)
    assert arch == sd_text.TextArch(width=32, layers=2, context_length=77, vocab_size=49408, embed_dim=16)


# ----------------------------------------------------------------------------- (e) errors


def one_line_error(fn, *args) -> str:
    with pytest.raises(WeightsError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_weights_errors_name_the_tensor():
    state = hf_model("quick_gelu").state_dict()
    key = "encoder.layers.1.self_attn.k_proj.weight"
    message = one_line_error(sd_text.native_from_hf, {**state, key: torch.zeros(32, 16)})
    assert key in message and "(32, 16)" in message and "(32, 32)" in message
    extra = "encoder.layers.0.self_attn.rotary.weight"
    assert extra in one_line_error(sd_text.native_from_hf, {**state, extra: torch.zeros(1)})
    missing = "encoder.layers.0.mlp.fc2.bias"
    assert missing in one_line_error(sd_text.native_from_hf, {k: v for k, v in state.items() if k != missing})
    assert "embeddings.token_embedding.weight" in one_line_error(sd_text.native_from_hf, {})

    tower = sd_text.openclip_from_native(TextEncoder(TextEncoderConfig(width=32, layers=2, heads=4)).state_dict())
    bad = "transformer.resblocks.0.attn.in_proj_weight"
    assert bad in one_line_error(sd_text.native_from_openclip, {**tower, bad: torch.zeros(32, 32)})
    assert "visual.proj" in one_line_error(sd_text.native_from_openclip, {**tower, "visual.proj": torch.zeros(1)})
    message = one_line_error(sd_text.single_file_text, {"cond_stage_model.model." + k: v for k, v in tower.items()
                                                         if k != "ln_final.bias"})
    assert "ln_final.bias" in message and "cond_stage_model.model." in message
    assert "no text encoder" in one_line_error(sd_text.single_file_text, {"model.diffusion_model.x": torch.zeros(1)})


def test_tokenizer_folder_errors(clip_vocab, tmp_path):
    assert "no tokenizer" in one_line_error(sd_text.read_tokenizer, tmp_path)
    sd_text.write_tokenizer(dataclasses.replace(clip_vocab, pad="<|pad|>"), tmp_path, 77)
    assert "'<|pad|>' is not in the vocabulary" in one_line_error(sd_text.read_tokenizer, tmp_path)


# ----------------------------------------------------------------------------- defaults


def test_configs_without_the_new_fields_keep_todays_encoder():
    """A pipeline.yaml saved before these fields existed builds the same encoder: gelu, projected, zero-padded."""
    from diffusion.config import from_dict

    cfg = from_dict(TextEncoderConfig, dict(width=32, layers=2, heads=4, context_length=12, vocab_size=49408,
                                            layer="last", trainable=False, arch=None, pretrained=None))
    encoder = TextEncoder(cfg)
    assert (encoder.activation, encoder.pad_id, encoder.tower.text_projection.shape) == ("gelu", 0, (32, 32))
    assert encoder.tokenize(["a red circle"])[0, 5:].eq(0).all()
