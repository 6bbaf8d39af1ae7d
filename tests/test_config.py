import pytest

from diffusion.config import Config, ConfigError, load_config, save_config, to_dict, from_dict

from conftest import ROOT


def test_required_keys_exist():
    cfg = Config()
    expected = {"output_dir": str, "seed": int, "data.path": str, "data.resolution": int, "vae_training.max_steps": int,
                "training.max_steps": int, "training.batch_size": int, "training.checkpoint_every": int}
    for dotted, kind in expected.items():
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert isinstance(node, kind) and not isinstance(node, bool), (dotted, node)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    # finetune.yaml and lora.yaml leave the data folder and the model to the command line
    required = ["data.path=photos", "model.pretrained=sd15"] if name in ("finetune.yaml", "lora.yaml") else []
    cfg = load_config(ROOT / "configs" / name, required)  # raises on an unknown key or a bad value
    assert cfg.name == name.removesuffix(".yaml") and from_dict(Config, to_dict(cfg)) == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["training.lr=2e-4", "unet.channel_mult=[1, 2]", "training.min_snr_gamma=5",
                                                   "data.flip=true", "training.validation_prompts=[a, b]"])
    assert cfg.training.lr == 2e-4 and isinstance(cfg.training.lr, float)
    assert cfg.unet.channel_mult == (1, 2)
    assert cfg.training.min_snr_gamma == 5.0
    assert cfg.data.flip is True
    assert cfg.training.validation_prompts == ("a", "b")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.lrr=1", "unknown config key 'training.lrr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("sampling.sampler=heun", "unknown sampler 'heun'"),
        ("training.max_steps=ten", "training.max_steps: expected int"),
        ("unet.channel_mult=3", "expected a list"),
        ("data.resolution=15", "divisible by the VAE factor"),
        ("unet.context_dim=32", "unet.context_dim"),
        ("training.lr", "key=value"),
        ("vae_training.hue_rotate=1.5", "vae_training.hue_rotate is a probability"),
        ("vae_training.color_shuffle=-0.1", "vae_training.color_shuffle is a probability"),
        ("data.caption_dropout=2", "data.caption_dropout is a probability"),
        ("text_encoder.layers=-1", "text_encoder.layers must be >= 0"),
    ],
)
def test_bad_keys_and_values_name_the_problem(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", ["vae.chanels=3"])
    assert "channels" in str(e.value) and "latent_channels" in str(e.value)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_yaml_booleans_stand_for_the_words_a_choice_offers():
    assert load_config(None, ["training.mixed_precision=no"]).training.mixed_precision == "no"  # YAML reads `no` as False
    with pytest.raises(ConfigError, match="training.mixed_precision: True is not one of"):
        load_config(None, ["training.mixed_precision=yes"])


def test_a_value_left_unset_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"^data.path is not set; give it on the command line, e.g. data.path=\.\.\.$"):
        load_config(ROOT / "configs" / "finetune.yaml", ["model.pretrained=sd15"])


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_penultimate_layer_needs_a_block():
    with pytest.raises(ConfigError, match="^text_encoder.layer: penultimate needs a tower of at least one block; set it to last$"):
        load_config(ROOT / "configs/tiny.yaml", ["text_encoder.layers=0", "text_encoder.layer=penultimate"])
