"""LoRA files on a tiny pipeline: every layout's ΔW = multiplier·alpha/rank·B·A lands on the right rows of our
(fused) weights, exports read back the same, every layer of a file is applied or the file is refused by name,
and merging restores the base bit for bit however often it is done.

The expectations are computed here, in fp64, from the tensors the test wrote and from a hand-written table of
where each SD-named layer sits in our weights (not from the code under test)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from diffusion.infotext import GenerationParams, split_lora_tags
from diffusion.lora import merge
from diffusion.lora.files import LoRAError, count_by_component, match, read_lora, write_kohya
from diffusion.lora.targets import pipeline_targets
from diffusion.pipeline import Pipeline

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
TEXT = "text_model.encoder.layers.0"
# SD name -> (component, our parameter, its rows, the layer's weight shape), for configs/tiny.yaml: written out by
# hand from the architecture (q, k, v fused in that order; a cross-attention fuses k, v; CLIP's in_proj q, k, v).
LAYERS = {
    f"{ATTN}.attn1.to_q": ("unet", "down.2.attn.blocks.0.attn1.to_qkv.weight", (0, 64), (64, 64)),
    f"{ATTN}.attn1.to_k": ("unet", "down.2.attn.blocks.0.attn1.to_qkv.weight", (64, 128), (64, 64)),
    f"{ATTN}.attn1.to_v": ("unet", "down.2.attn.blocks.0.attn1.to_qkv.weight", (128, 192), (64, 64)),
    f"{ATTN}.attn1.to_out.0": ("unet", "down.2.attn.blocks.0.attn1.to_out.weight", (0, 64), (64, 64)),
    f"{ATTN}.attn2.to_q": ("unet", "down.2.attn.blocks.0.attn2.to_q.weight", (0, 64), (64, 64)),
    f"{ATTN}.attn2.to_k": ("unet", "down.2.attn.blocks.0.attn2.to_kv.weight", (0, 64), (64, 64)),
    f"{ATTN}.attn2.to_v": ("unet", "down.2.attn.blocks.0.attn2.to_kv.weight", (64, 128), (64, 64)),
    f"{ATTN}.ff.net.0.proj": ("unet", "down.2.attn.blocks.0.ff.proj.weight", (0, 512), (512, 64)),
    f"{ATTN}.ff.net.2": ("unet", "down.2.attn.blocks.0.ff.out.weight", (0, 64), (64, 256)),
    "down_blocks.1.attentions.0.proj_in": ("unet", "down.2.attn.proj_in.weight", (0, 64), (64, 64, 1, 1)),
    "down_blocks.1.resnets.0.conv1": ("unet", "down.2.res.conv1.weight", (0, 64), (64, 32, 3, 3)),  # LoCon: 3x3 down, 1x1 up
    f"{TEXT}.self_attn.q_proj": ("text_encoder", "tower.transformer.resblocks.0.attn.in_proj_weight", (0, 64), (64, 64)),
    f"{TEXT}.self_attn.k_proj": ("text_encoder", "tower.transformer.resblocks.0.attn.in_proj_weight", (64, 128), (64, 64)),
    f"{TEXT}.self_attn.v_proj": ("text_encoder", "tower.transformer.resblocks.0.attn.in_proj_weight", (128, 192), (64, 64)),
    f"{TEXT}.self_attn.out_proj": ("text_encoder", "tower.transformer.resblocks.0.attn.out_proj.weight", (0, 64), (64, 64)),
    f"{TEXT}.mlp.fc1": ("text_encoder", "tower.transformer.resblocks.0.mlp.c_fc.weight", (0, 256), (256, 64)),
}
RANK = 4


@pytest.fixture(scope="module")
def base_pipe(tiny_config):
    torch.manual_seed(0)
    return Pipeline(tiny_config.pipeline_config(trained_on="nothing (random weights)"))


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


def tensors(seed: int, names=LAYERS, scale: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) per layer; large enough that ΔW outweighs the base (so an fp32 merge shows)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        shape = LAYERS[name][3]
        down = torch.randn((RANK, *shape[1:]), generator=g) * scale
        up = torch.randn((shape[0], RANK, *([1, 1] if len(shape) == 4 else [])), generator=g) * scale
        out[name] = (down, up)
    return out


def kohya_key(name: str) -> str:
    return ("lora_unet_" if LAYERS[name][0] == "unet" else "lora_te_") + name.replace(".", "_")


def write_kohya_by_hand(path, layers, alphas: dict[str, float] | None = None):
    state = {}
    for name, (down, up) in layers.items():
        state[f"{kohya_key(name)}.lora_down.weight"] = down
        state[f"{kohya_key(name)}.lora_up.weight"] = up
        if alphas is not None and name in alphas:
            state[f"{kohya_key(name)}.alpha"] = torch.tensor(alphas[name])
    save_file(state, str(path))
    return path


def delta64(down, up, alpha, multiplier, shape) -> torch.Tensor:
    """multiplier · alpha/rank · B·A in fp64, shaped like the layer's weight."""
    b = up.double().reshape(up.shape[0], -1)
    a = down.double().reshape(down.shape[0], -1)
    return (multiplier * alpha / down.shape[0] * (b @ a)).reshape(shape)


def snapshot(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}


def assert_correctly_rounded(got: torch.Tensor, want64: torch.Tensor, what: str):
    """got is want64 rounded once to got's dtype: the sum was formed in fp64, not in got's precision.

    torch casts fp64 to fp16 through fp32, so an fp16 value may sit up to half an fp32 ulp past the midpoint.
    """
    spacing = (torch.nextafter(got.abs(), torch.tensor(float("inf"), dtype=got.dtype)) - got.abs()).double()
    err = (got.double() - want64).abs()
    slack = want64.abs() * 2.0**-24 if got.dtype != torch.float32 else want64.abs() * 1e-12
    assert (err <= spacing * 0.5 + slack).all(), f"{what}: off by up to {(err / spacing).max():.6f} ulp"


def check_merged(pipe, base, expected: dict[str, torch.Tensor]):
    """Each layer's rows are base + its ΔW; every other value of every weight is the base, bit for bit."""
    touched: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for name, delta in expected.items():
        component, param, (r0, r1), shape = LAYERS[name]
        got = getattr(pipe, component).state_dict()[param][r0:r1]
        want = base[component][param][r0:r1].double() + delta
        assert not torch.equal(got, base[component][param][r0:r1]), f"{name} was not applied"
        assert_correctly_rounded(got, want, name)
        touched.setdefault((component, param), []).append((r0, r1))
    for component, state in base.items():
        now = getattr(pipe, component).state_dict()
        for param, value in state.items():
            rows = touched.get((component, param), [])
            keep = torch.ones(value.shape[0], dtype=torch.bool) if value.ndim else torch.tensor(True)
            for r0, r1 in rows:
                keep[r0:r1] = False
            assert torch.equal(now[param][keep], value[keep]), f"{component}.{param}: rows no layer adapts changed"


# ---------------------------------------------------------------- ΔW on every import path


def test_kohya_alpha_and_fused_rows(pipe, tmp_path):
    layers = tensors(1)
    alphas = {name: float(1 + i % 5) for i, name in enumerate(LAYERS)}  # 1..5 against rank 4
    file = write_kohya_by_hand(tmp_path / "k.safetensors", layers, alphas)
    base = snapshot(pipe)
    pipe.set_loras([(read_lora(file), 0.6)])
    check_merged(pipe, base, {n: delta64(d, u, alphas[n], 0.6, LAYERS[n][3]) for n, (d, u) in layers.items()})


def test_kohya_without_alpha_means_alpha_equals_rank(pipe, tmp_path):
    layers = tensors(2)
    with_alpha = {n: 2.0 for n in list(LAYERS)[::2]}  # half the layers carry alpha 2, the rest none
    file = write_kohya_by_hand(tmp_path / "k.safetensors", layers, with_alpha)
    base = snapshot(pipe)
    pipe.set_loras([(read_lora(file), -1.5)])
    check_merged(pipe, base, {n: delta64(d, u, with_alpha.get(n, RANK), -1.5, LAYERS[n][3]) for n, (d, u) in layers.items()})


def diffusers_state(layers, names: str = "lora_A") -> dict[str, torch.Tensor]:
    """diffusers' save_lora_weights keys; names="old" gives what convert_state_dict_to_diffusers writes (U-Net
    attention as .lora.down/.lora.up, text layers as .lora_linear_layer, the rest lora_A/lora_B)."""
    state = {}
    for name, (down, up) in layers.items():
        component = LAYERS[name][0]
        key = f"{component}.{name}"
        if names == "old" and component == "text_encoder":
            parts = ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")
        elif names == "old" and ".attn" in name:
            parts = ("lora.down.weight", "lora.up.weight")
        else:
            parts = ("lora_A.weight", "lora_B.weight")
        state[f"{key}.{parts[0]}"], state[f"{key}.{parts[1]}"] = down, up
    return state


def diffusers_metadata(unet: dict, text: dict) -> dict[str, str]:
    packed = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text.items()}}
    return {"lora_adapter_metadata": json.dumps(packed), "format": "pt"}


@pytest.mark.parametrize("names", ["lora_A", "old"])
def test_diffusers_metadata_alpha_and_alpha_pattern(pipe, tmp_path, names):
    layers = tensors(3)
    unet_cfg = {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"ff.net.2": 2, "attn2.to_k": 1}, "use_rslora": False}
    text_cfg = {"r": RANK, "lora_alpha": 1, "alpha_pattern": {}}
    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(diffusers_state(layers, names), str(file), metadata=diffusers_metadata(unet_cfg, text_cfg))

    def alpha(name):
        if LAYERS[name][0] == "text_encoder":
            return 1.0
        return 2.0 if name.endswith("ff.net.2") else 1.0 if name.endswith("attn2.to_k") else 8.0

    base = snapshot(pipe)
    pipe.set_loras([(read_lora(file), 0.7)])
    check_merged(pipe, base, {n: delta64(d, u, alpha(n), 0.7, LAYERS[n][3]) for n, (d, u) in layers.items()})


def test_rslora_scales_by_alpha_over_root_rank(pipe, tmp_path):
    layers = tensors(4, [f"{ATTN}.attn1.to_q", "down_blocks.1.resnets.0.conv1"])
    file = tmp_path / "l.safetensors"
    save_file(diffusers_state(layers), str(file), metadata=diffusers_metadata({"r": RANK, "lora_alpha": 8, "use_rslora": True}, {}))
    base = snapshot(pipe)
    pipe.set_loras([(read_lora(file), 1.0)])
    # peft's rsLoRA scale alpha/√r is (alpha·√r)/r
    check_merged(pipe, base, {n: delta64(d, u, 8 * RANK**0.5, 1.0, LAYERS[n][3]) for n, (d, u) in layers.items()})


def write_peft(folder, layers, config: dict, text_model: bool = True):
    """What peft's save_pretrained writes: base_model.model.<module path> keys, alpha in adapter_config.json."""
    folder.mkdir()
    state = {}
    for name, (down, up) in layers.items():
        path = name if text_model else name.removeprefix("text_model.")
        state[f"base_model.model.{path}.lora_A.weight"], state[f"base_model.model.{path}.lora_B.weight"] = down, up
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, **config}))
    return folder / "adapter_model.safetensors"


def test_peft_save_pretrained_prefix_and_adapter_config(pipe, tmp_path):
    unet_names = [n for n in LAYERS if LAYERS[n][0] == "unet"]
    layers = tensors(5, unet_names)
    file = write_peft(tmp_path / "adapter", layers, {"lora_alpha": 16, "alpha_pattern": {"proj_in": 4}})
    base = snapshot(pipe)
    pipe.set_loras([(read_lora(file), 0.25)])
    check_merged(pipe, base, {n: delta64(d, u, 4 if n.endswith("proj_in") else 16, 0.25, LAYERS[n][3]) for n, (d, u) in layers.items()})


@pytest.mark.parametrize("text_model", [True, False], ids=["text_model.", "no text_model. (transformers 5)"])
@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_text_encoder_keys_with_and_without_the_text_model_wrapper(pipe, tmp_path, layout, text_model):
    text_names = [n for n in LAYERS if LAYERS[n][0] == "text_encoder"]
    layers = tensors(6, text_names)
    if layout == "peft":
        file = write_peft(tmp_path / "adapter", layers, {"lora_alpha": 2}, text_model=text_model)
    else:
        state = {k if text_model else k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in diffusers_state(layers).items()}
        file = tmp_path / "l.safetensors"
        save_file(state, str(file), metadata=diffusers_metadata({}, {"r": RANK, "lora_alpha": 2}))
    base = snapshot(pipe)
    pipe.set_loras([(read_lora(file), 1.0)])
    check_merged(pipe, base, {n: delta64(d, u, 2.0, 1.0, LAYERS[n][3]) for n, (d, u) in layers.items()})


# ---------------------------------------------------------------- layouts round trip


def merged_state(base_pipe, file, multiplier=0.8):
    p = copy.deepcopy(base_pipe)
    p.set_loras([(read_lora(file), multiplier)])
    return snapshot(p)


def assert_same_state(a, b):
    for component in a:
        for k in a[component]:
            assert torch.equal(a[component][k], b[component][k]), f"{component}.{k}"


def test_kohya_export_reads_back_the_same_delta(base_pipe, tmp_path):
    layers = tensors(7)
    file = tmp_path / "d.safetensors"
    save_file(diffusers_state(layers, "old"), str(file), metadata=diffusers_metadata({"r": RANK, "lora_alpha": 8, "alpha_pattern": {"to_v": 3}}, {"r": RANK, "lora_alpha": 5}))
    matched = match(read_lora(file), pipeline_targets(base_pipe), "d")
    write_kohya(matched, tmp_path / "k.safetensors", {"ss_network_module": "networks.lora"})
    again = match(read_lora(tmp_path / "k.safetensors"), pipeline_targets(base_pipe), "k")
    assert set(again) == set(matched)
    for t in matched:
        assert torch.equal(again[t].delta(t.shape), matched[t].delta(t.shape)), t.name
    assert_same_state(merged_state(base_pipe, tmp_path / "k.safetensors"), merged_state(base_pipe, file))
    # and its export of itself is itself
    write_kohya(again, tmp_path / "k2.safetensors", {})
    assert_same_state(merged_state(base_pipe, tmp_path / "k2.safetensors"), merged_state(base_pipe, file))


def test_peft_file_gives_the_delta_of_its_kohya_export(base_pipe, tmp_path):
    layers = tensors(8)
    file = write_peft(tmp_path / "adapter", layers, {"lora_alpha": 6, "alpha_pattern": {"conv1": 1}}, text_model=False)
    matched = match(read_lora(file), pipeline_targets(base_pipe), "p")
    write_kohya(matched, tmp_path / "k.safetensors", {})
    assert_same_state(merged_state(base_pipe, tmp_path / "k.safetensors", -0.4), merged_state(base_pipe, file, -0.4))


# ---------------------------------------------------------------- partial loads are refused, never half applied


def test_every_layer_of_a_mixed_file_is_applied(pipe, tmp_path):
    layers = tensors(9)
    file = write_kohya_by_hand(tmp_path / "k.safetensors", layers, {n: 1.0 for n in layers})
    lora = read_lora(file)
    n_unet = sum(LAYERS[n][0] == "unet" for n in LAYERS)
    assert count_by_component(match(lora, pipeline_targets(pipe), "k")) == {"unet": n_unet, "text_encoder": len(LAYERS) - n_unet}
    assert merge.describe(pipe, [(lora, 1.0)]) == f"LoRA k ×1: {n_unet} U-Net layers, {len(LAYERS) - n_unet} text-encoder layers"
    base = snapshot(pipe)
    pipe.set_loras([(lora, 1.0)])
    check_merged(pipe, base, {n: delta64(d, u, 1.0, 1.0, LAYERS[n][3]) for n, (d, u) in layers.items()})  # asserts each changed


def refused(pipe, file, *needles):
    before = snapshot(pipe)
    with pytest.raises(LoRAError) as e:
        pipe.set_loras([(read_lora(file), 1.0)])
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert_same_state(snapshot(pipe), before)  # nothing applied
    return message


def test_an_unmatched_layer_is_refused_by_name(pipe, tmp_path):
    layers = tensors(10)
    state = diffusers_state(layers)
    state["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = torch.zeros(RANK, 64, 1, 1)
    state["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = torch.zeros(64, RANK, 1, 1)
    save_file(state, str(tmp_path / "l.safetensors"))
    refused(pipe, tmp_path / "l.safetensors", "unet.down_blocks.7.attentions.0.proj_in", "matches no layer")


def test_sdxl_text_encoder_keys_are_refused(pipe, tmp_path):
    layers = tensors(11, [f"{TEXT}.self_attn.q_proj"])
    state = {k.replace("lora_te_", "lora_te1_"): v for k, v in {
        f"{kohya_key(n)}.{p}": t for n, (d, u) in layers.items() for p, t in (("lora_down.weight", d), ("lora_up.weight", u))}.items()}
    save_file(state, str(tmp_path / "xl.safetensors"))
    refused(pipe, tmp_path / "xl.safetensors", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")


@pytest.mark.parametrize("bad", ["fan_in", "out", "kernel"])
def test_a_wrong_shape_layer_is_refused_by_name(pipe, tmp_path, bad):
    layers = tensors(12)
    name = "down_blocks.1.resnets.0.conv1" if bad == "kernel" else f"{ATTN}.attn2.to_k"
    down, up = layers[name]
    if bad == "fan_in":  # SD 2.x's 1024-wide context against a 64-wide one, say
        down = torch.randn(RANK, 96)
    elif bad == "out":
        up = torch.randn(80, RANK)
    else:  # a 1x1 LoCon kernel for a 3x3 convolution
        down = down[:, :, :1, :1].contiguous()
    layers[name] = (down, up)
    write_kohya_by_hand(tmp_path / "k.safetensors", layers)
    refused(pipe, tmp_path / "k.safetensors", kohya_key(name), "another base model")


def test_an_up_weight_that_is_not_1x1_is_refused(tmp_path):
    layers = tensors(13, ["down_blocks.1.resnets.0.conv1"])
    down, up = layers["down_blocks.1.resnets.0.conv1"]
    write_kohya_by_hand(tmp_path / "k.safetensors", {"down_blocks.1.resnets.0.conv1": (down, up.expand(-1, -1, 3, 3).contiguous())})
    with pytest.raises(LoRAError, match="do not form B·A"):
        read_lora(tmp_path / "k.safetensors")


@pytest.mark.parametrize("key", ["lora_unet_x.hada_w1_a", "lora_unet_x.lokr_w1", "unet.x.lora_magnitude_vector"])
def test_lycoris_and_dora_are_refused(tmp_path, key):
    save_file({key: torch.zeros(2, 2), "lora_unet_y.lora_down.weight": torch.zeros(1, 2), "lora_unet_y.lora_up.weight": torch.zeros(2, 1)},
              str(tmp_path / "ly.safetensors"))
    with pytest.raises(LoRAError) as e:
        read_lora(tmp_path / "ly.safetensors")
    assert key in str(e.value) and "\n" not in str(e.value)


class _Payload:
    """Unpickling it creates a file: proof that a loader ran the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.ckpt", "evil.bin", "evil.safetensors"])
def test_pickled_files_are_refused_unread(tmp_path, name):
    marker = tmp_path / "ran"
    with open(tmp_path / name, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Payload(marker)}, f)
    with pytest.raises(LoRAError) as e:
        read_lora(tmp_path / name)
    assert "\n" not in str(e.value) and name in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [4, 40, -100])
def test_a_truncated_file_is_one_line(tmp_path, keep):
    write_kohya_by_hand(tmp_path / "full.safetensors", tensors(14), {n: 1.0 for n in LAYERS})
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:keep])
    with pytest.raises(LoRAError) as e:
        read_lora(tmp_path / "cut.safetensors")
    assert "\n" not in str(e.value) and "cut.safetensors" in str(e.value)


def test_a_missing_file_and_an_empty_one(tmp_path):
    with pytest.raises(LoRAError, match="not found"):
        read_lora(tmp_path / "none.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(LoRAError, match="no tensors"):
        read_lora(tmp_path / "empty.safetensors")


# ---------------------------------------------------------------- merging


@pytest.fixture
def two_loras(tmp_path):
    a = write_kohya_by_hand(tmp_path / "a.safetensors", tensors(15, scale=0.3), {n: 3.0 for n in LAYERS})
    b_names = [f"{ATTN}.attn1.to_k", f"{ATTN}.attn2.to_v", f"{TEXT}.self_attn.v_proj", "down_blocks.1.resnets.0.conv1"]
    b = write_kohya_by_hand(tmp_path / "b.safetensors", tensors(16, b_names, scale=0.3))
    return read_lora(a), read_lora(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_and_remove_100_times_restores_the_base_bit_for_bit(pipe, two_loras, monkeypatch, dtype):
    a, b = two_loras
    pipe.to("cpu", dtype)
    targets = pipeline_targets(pipe)
    monkeypatch.setattr(merge, "pipeline_targets", lambda _pipe: targets)  # the same table every time, computed once
    base = snapshot(pipe)
    adapted = {(c, LAYERS[n][1]) for n, (c, *_) in LAYERS.items()}
    stacks = [[(a, 0.7)], [(b, -1.3)], [(a, 0.5), (b, 2.0)], [(b, 0.9), (a, 0.9)]]
    for i in range(100):
        pipe.set_loras(stacks[i % len(stacks)])
        if i % 3 == 0:  # and straight from one stack to another, without removing in between
            pipe.set_loras(stacks[(i + 1) % len(stacks)])
        pipe.set_loras([])
        assert pipe.loras == [] and pipe.lora_base == {}
        for component, param in adapted:
            assert torch.equal(getattr(pipe, component).state_dict()[param], base[component][param]), (i, param)
    assert_same_state(snapshot(pipe), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_stack_is_summed_in_fp64_from_the_base(pipe, two_loras, dtype):
    a, b = two_loras
    pipe.to("cpu", dtype)
    base = snapshot(pipe)
    pipe.set_loras([(a, 0.5)])
    pipe.set_loras([(b, 0.25), (a, -0.75)])  # from the base, not on top of a's merge
    for name in LAYERS:
        component, param, (r0, r1), shape = LAYERS[name]
        want = base[component][param][r0:r1].double()
        for lora, m in ((b, 0.25), (a, -0.75)):
            layer = lora.layers.get(kohya_key(name))
            if layer is not None:
                want = want + delta64(layer.down, layer.up, layer.alpha, m, shape)
        got = getattr(pipe, component).state_dict()[param][r0:r1]
        assert got.dtype == dtype
        assert_correctly_rounded(got, want, name)


def test_a_refused_stack_leaves_the_applied_one(pipe, two_loras, tmp_path):
    a, _ = two_loras
    pipe.set_loras([(a, 1.0)])
    applied = snapshot(pipe)
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 4), "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 1)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoRAError, match="lora_unet_nowhere"):
        pipe.set_loras([(a, 1.0), (read_lora(tmp_path / "bad.safetensors"), 1.0)])
    assert_same_state(snapshot(pipe), applied)
    assert [(x.name, x.multiplier) for x in pipe.loras] == [("a", 1.0)]


# ---------------------------------------------------------------- infotext


def test_loras_round_trip_through_infotext_and_json():
    params = GenerationParams(prompt="a red circle\nin the top left", negative_prompt="blurry", steps=20, seed=7,
                              loras=(("ink style", 0.8, "0123456789ab"), ("b", -0.35, "ba9876543210"), ("nohash", 1.0, "")))
    text = params.to_infotext()
    assert "a red circle\nin the top left <lora:ink style:0.8> <lora:b:-0.35> <lora:nohash:1>" in text
    assert 'Lora hashes: "ink style: 0123456789ab, b: ba9876543210"' in text
    assert GenerationParams.from_infotext(text) == params
    assert GenerationParams.from_json(params.to_json()) == params
    odd = GenerationParams(prompt="x", loras=(("a", 1 / 3, "h"),))  # a multiplier that %g would round
    assert GenerationParams.from_infotext(odd.to_infotext()) == odd
    plain = GenerationParams(prompt="no adapters")
    assert "Lora" not in plain.to_infotext() and GenerationParams.from_infotext(plain.to_infotext()) == plain


def test_split_lora_tags():
    assert split_lora_tags("a cat <lora:ink:0.8>, on a mat <lora:b>") == ("a cat, on a mat", [("ink", 0.8), ("b", 1.0)])
    assert split_lora_tags("<lora:a b:-1.5:0.2>a dog") == ("a dog", [("a b", -1.5)])  # A1111's te:unet form keeps the first
    assert split_lora_tags("no tags,  kept   as is") == ("no tags,  kept   as is", [])
    assert split_lora_tags("two\nlines <lora:x:2>") == ("two\nlines", [("x", 2.0)])
    with pytest.raises(ValueError, match="multiplier must be a number"):
        split_lora_tags("a <lora:x:strong>")
