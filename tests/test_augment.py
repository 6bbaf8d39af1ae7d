"""One augmentation path: flips and captions come from the run's generator, cached latents or not."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from diffusion.config import DataConfig
from diffusion.data import ImageCaptionDataset, generate_shapes, index_folder
from diffusion.train.augment import Augmentation, mirror
from diffusion.train.cache import LatentSource

CPU = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)
BATCHES = [[5, 0, 3, 7], [1, 6, 2, 4]]


def test_augmentation_draws_flips_and_captions_independently():
    dataset = SimpleNamespace(captions=lambda i: ["a", "b"])
    g = torch.Generator().manual_seed(0)
    assert not Augmentation(dataset, DataConfig(flip=False)).flips(50, g).any()
    flips = Augmentation(dataset, DataConfig(flip=True)).flips(200, g)
    assert 50 < int(flips.sum()) < 150
    # Dropout and the choice among captions come from separate draws: every outcome occurs.
    captions = Augmentation(dataset, DataConfig(caption_dropout=0.5)).captions(list(range(200)), g)
    assert {c: captions.count(c) > 20 for c in ("", "a", "b")} == {"": True, "a": True, "b": True}
    assert set(Augmentation(dataset, DataConfig(caption_dropout=0.0)).captions(list(range(50)), g)) == {"a", "b"}
    assert set(Augmentation(dataset, DataConfig(caption_dropout=1.0)).captions(list(range(50)), g)) == {""}


@pytest.fixture
def sources(tmp_path, tiny_config, tiny_pipeline, monkeypatch):
    """(dataset, cached LatentSource, uncached LatentSource, draw); draw(source) reads BATCHES with a seed-123
    generator and returns ([(indices, z0, token ids)], the flips drawn, the captions tokenized)."""
    data = tmp_path / "data"
    generate_shapes(data, num=8, size=16)

    def config(cache: bool):
        return dataclasses.replace(
            tiny_config,
            data=dataclasses.replace(tiny_config.data, path=str(data), flip=True, caption_dropout=0.5, crop="center", num_workers=0),
            training=dataclasses.replace(tiny_config.training, cache_latents=cache),
            text_encoder=dataclasses.replace(tiny_config.text_encoder, trainable=True),
        )

    dataset = ImageCaptionDataset(index_folder(data, config(True).data), config(True).data)
    flips_seen, captions_seen = [], []
    flips, tokenize = Augmentation.flips, type(tiny_pipeline.text_encoder).tokenize
    monkeypatch.setattr(Augmentation, "flips", lambda self, n, g: flips_seen.append(flips(self, n, g)) or flips_seen[-1])
    monkeypatch.setattr(type(tiny_pipeline.text_encoder), "tokenize", lambda self, c: captions_seen.append(list(c)) or tokenize(self, c))

    def draw(source):
        flips_seen.clear(), captions_seen.clear()
        g = torch.Generator().manual_seed(123)
        out = [(b["index"].tolist(), source.latents(b, g), source.conditioning(b, g)) for b in source.load(0, BATCHES)]
        return out, list(flips_seen), list(captions_seen)

    cached = LatentSource(tiny_pipeline, dataset, config(True), tmp_path / "cache", CPU)
    uncached = LatentSource(tiny_pipeline, dataset, config(False), tmp_path / "cache-unused", CPU)
    assert cached.cached and not uncached.cached and not (tmp_path / "cache-unused").exists()
    return dataset, cached, uncached, draw


def test_cached_and_uncached_latents_make_the_same_augmentation_choices(sources):
    """Same seed, same flips and captions whether latents come from the cache or are encoded per batch,
    and the latents of the same (possibly mirrored) images."""
    dataset, cached, uncached, draw = sources
    (c_out, c_flips, c_caps), (u_out, u_flips, u_caps) = draw(cached), draw(uncached)
    assert [i for i, _, _ in c_out] == [i for i, _, _ in u_out] == BATCHES
    assert len(c_flips) == 2 and all(torch.equal(a, b) for a, b in zip(c_flips, u_flips))
    assert c_caps == u_caps and len(c_caps) == 2
    for (_, c_z, c_tok), (_, u_z, u_tok) in zip(c_out, u_out):
        assert torch.equal(c_tok, u_tok)
        assert c_z.shape == (4, 4, 8, 8) and torch.allclose(c_z, u_z, atol=1e-4), (c_z - u_z).abs().max()
    # The seed exercises both branches of each choice, and captions come from the right images.
    all_flips, all_caps = torch.cat(c_flips), [c for caps in c_caps for c in caps]
    assert all_flips.any() and not all_flips.all()
    assert "" in all_caps and any(all_caps)
    assert all(c == "" or c in dataset.captions(i) for c, i in zip(all_caps, [i for b in BATCHES for i in b]))


def test_a_cached_latent_comes_from_the_chosen_view(sources, tiny_pipeline):
    """With the cached std set to 0, a latent is the posterior mean of exactly the (possibly mirrored) image."""
    dataset, cached, _, draw = sources
    moments = cached.moments
    cached.moments = lambda indices, flips: (moments(indices, flips)[0], torch.zeros(len(indices), 4, 8, 8))
    mirrored_differs = False
    for idx, z, _ in (out := draw(cached))[0]:
        f = out[1][BATCHES.index(idx)]
        x = torch.stack([dataset.pixels_for_cache(i) for i in idx])
        with torch.no_grad():
            expected, unmirrored = tiny_pipeline.encode(mirror(x, f)), tiny_pipeline.encode(x)
        assert torch.allclose(z, expected, atol=1e-5)
        mirrored_differs |= not torch.allclose(z, unmirrored, atol=1e-3)
    assert mirrored_differs  # some flipped image is not symmetric, so the check above can tell the views apart


def test_shuffle_channels_reorders_colors_and_draws_nothing_when_off():
    from diffusion.train.augment import shuffle_channels

    x = torch.rand(64, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert shuffle_channels(x, 0.0, g) is x and torch.equal(g.get_state(), state)
    y = shuffle_channels(x, 1.0, g)
    for a, b in zip(x, y):  # each image: the same three planes, in another order
        order = [next(i for i in range(3) if torch.equal(b[c], a[i])) for c in range(3)]
        assert sorted(order) == [0, 1, 2] and order != [0, 1, 2]
    half = shuffle_channels(x, 0.5, torch.Generator().manual_seed(1))
    kept = sum(torch.equal(a, b) for a, b in zip(x, half))
    assert 16 < kept < 48  # about half the images keep their colors


def test_rotate_hue_keeps_grey_turns_colors_and_draws_nothing_when_off():
    from diffusion.train.augment import rotate_hue

    palette = torch.tensor([[220, 40, 40], [40, 180, 60], [240, 240, 240], [0, 0, 0], [128, 128, 128]]) / 127.5 - 1
    x = palette[:, :, None, None].expand(5, 3, 2, 2).repeat(40, 1, 1, 1)  # (200, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert rotate_hue(x, 0.0, g) is x and torch.equal(g.get_state(), state)
    y = rotate_hue(x, 1.0, g)
    grey = torch.tensor([c in (2, 3, 4) for c in range(5)] * 40)
    assert torch.allclose(y[grey], x[grey], atol=1e-5)  # black, white and grey have no hue to turn
    red = y[0::5, :, 0, 0]  # the red images' colors after their random turns
    hues = torch.atan2(3**0.5 * (red[:, 1] - red[:, 2]), 2 * red[:, 0] - red[:, 1] - red[:, 2])
    assert hues.max() - hues.min() > 5  # spread around the circle (2*pi ~ 6.28), not a few fixed hues
    assert ((red[:, 1] > red[:, 0] + 0.3) & (red[:, 2] > red[:, 0] + 0.3)).any()  # some red turned cyan-like
    half = rotate_hue(x, 0.5, torch.Generator().manual_seed(1))
    kept = sum(torch.equal(a, b) for a, b in zip(x[~grey], half[~grey]))
    assert 30 < kept < 90  # about half of the 120 colored images keep their colors
