"""The training input without Ray: held in memory or streamed from real shards, split by rank, sampled."""
from collections import Counter

import numpy as np
import pytest
import torch

from clustering import engine
from clustering.data import inputs, shards
from clustering.comm import Comm
from clustering.config import TrainConfig
from clustering.data.sources import digits_source


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    src = digits_source()
    stats = [shards.write_items(src, g, f"{root}/{shards.shard_name(i)}")
             for i, g in enumerate(shards.plan_shards(src.plan(), 500, 1 << 30))]
    shapes = sum((Counter(s["shapes"]) for s in stats), Counter())
    manifest = {"shards": [s["shard"] for s in stats], "num_samples": 1797,
                "image": shards.choose_image(shards.shape_summary(shapes))}
    shards.write_manifest(root, manifest)
    return root, manifest, src.images


def image_set(images: np.ndarray) -> Counter:
    return Counter(bytes(im) for im in images.reshape(len(images), -1))


def open_quiet(cfg, manifest, rank=0, world=1):
    return inputs.open_input(cfg, manifest, Comm(rank, world), "cpu", log=lambda s: None)


def test_a_stream_steps_as_asked_and_yields_every_image(digit_shards):
    root, manifest, images = digit_shards
    data = open_quiet(TrainConfig(shards=root, input="stream", loader_workers=0, shuffle_buffer=64), manifest)
    assert isinstance(data, inputs.StreamInput) and data.n == 1797
    batches = list(data.batches(0, 30, 128, seed=0, rank=0))
    assert len(batches) == 30 and all(idx is None and x.shape == (128, 1, 8, 8) and x.dtype == torch.uint8
                                      for x, idx in batches)
    seen = image_set(torch.cat([x for x, _ in batches]).numpy())
    assert set(seen) == set(image_set(images))  # 3,840 draws: one whole pass and more
    assert len(list(data.batches(1, 5, 128, seed=0, rank=0))) == 5  # the next epoch goes on with the same stream
    data.close()


def test_a_streamed_run_that_needs_held_images_is_refused_before_it_trains(digit_shards):
    root, manifest, _ = digit_shards
    for key in ("neighbours", "selflabel_epochs"):
        cfg = TrainConfig.of(shards=root, input="stream", loader_workers=0, method="nmm", **{key: 5})
        data = open_quiet(cfg, manifest)
        try:
            with pytest.raises(ValueError, match=f"train.method.{key}=5 needs the images held in memory.*"
                                                 "train.input=memory"):
                engine.fit(data, cfg, log=lambda s: pytest.fail("it trained"))
        finally:
            data.close()


def test_the_same_seed_streams_the_same_batches(digit_shards):
    root, manifest, _ = digit_shards
    cfg = TrainConfig(shards=root, input="stream", loader_workers=0, shuffle_buffer=100)
    first, again = ([x for x, _ in open_quiet(cfg, manifest).batches(0, 4, 64, seed=3, rank=0)] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = [x for x, _ in open_quiet(cfg, manifest).batches(0, 4, 64, seed=4, rank=0)]
    assert not torch.equal(first[0], other[0])


def test_ranks_split_a_sample_and_stream_only_its_images(digit_shards):
    root, manifest, images = digit_shards
    cfg = TrainConfig(shards=root, input="stream", sample=500, loader_workers=0, shuffle_buffer=50)
    plans = [inputs.plan_rank(cfg, manifest, r, 2) for r in range(2)]
    assert sum(p.local_n for p in plans) == 500 and all(p.global_n == 500 for p in plans)
    assert not set(plans[0].uris) & set(plans[1].uris)
    chosen = shards.sample_members(manifest, 500, cfg.sample_seed)
    first_row = {s["name"]: i * 500 for i, s in enumerate(manifest["shards"])}  # keys digits/000000.. in row order
    sampled = {bytes(images[first_row[name] + p]) for name, pos in chosen.items() for p in pos}
    data = open_quiet(cfg, manifest, 0, 2)
    streamed = image_set(torch.cat([x for x, _ in data.batches(0, 20, 64, seed=0, rank=0)]).numpy())
    assert set(streamed) <= sampled
    data.close()


def test_auto_streams_only_over_the_budget(digit_shards):
    root, manifest, _ = digit_shards
    held = open_quiet(TrainConfig(shards=root, memory_budget_gb=1.0), manifest)
    assert isinstance(held, inputs.MemoryInput) and held.sample.shape == (1797, 1, 8, 8)
    streamed = open_quiet(TrainConfig(shards=root, memory_budget_gb=1e-5, stats_sample=300, loader_workers=0), manifest)
    assert isinstance(streamed, inputs.StreamInput) and streamed.sample.shape == (300, 1, 8, 8)


def test_the_conv_autoencoders_read_small_images_enlarged_to_their_least_side(digit_shards):
    root, manifest, _ = digit_shards
    assert TrainConfig.of(method="dcec").side_for(28) == 28 and TrainConfig.of(method="nmm").side_for(8) == 8
    assert TrainConfig.of(method="dcec", encoder="mlp").side_for(8) == 8  # DEC's MLP reads pixels, not maps
    assert TrainConfig.of(method="dcec", image_size=8).side_for(8) == 8  # the user's side wins
    held = open_quiet(TrainConfig.of(shards=root, method="dcec"), manifest)
    assert held.sample.shape == (1797, 1, 16, 16)  # the 8x8 digits, by the input policy


def test_a_small_share_held_in_memory_cycles_to_the_steps_asked():
    # a rank holding 197 of 1,797 images steps as often as the rank holding 1,600 (the engine sizes the steps from
    # the global count): 8 batches of 128, its images cycled, none left out
    images = digits_source().images[:197, :, :, None]
    data = inputs.MemoryInput(images, "cpu")
    batches = list(data.batches(0, 8, 128, seed=0, rank=1))
    assert len(batches) == 8 and all(x.shape == (128, 1, 8, 8) for x, _ in batches)
    assert set(image_set(torch.cat([x for x, _ in batches]).numpy())) == set(image_set(images))
