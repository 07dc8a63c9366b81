import numpy as np

from clustering import shards
from clustering.sources import open_source


def test_plan_respects_count_and_bytes():
    from clustering.sources import Item

    items = [Item(f"k{i}", i, 100) for i in range(10)]
    assert [len(g) for g in shards.plan_shards(items, 4, 10_000)] == [4, 4, 2]
    assert [len(g) for g in shards.plan_shards(items, 100, 250)] == [2, 2, 2, 2, 2]


def test_round_trip_sorted_with_labels(tmp_path):
    src = open_source("sklearn:digits")
    items = src.plan()[:20][::-1]  # written in reverse: the writer must sort
    stats = shards.write_items(src, items, str(tmp_path / shards.shard_name(0)))
    assert stats["shard"]["samples"] == 20 and not stats["skipped"]
    samples = shards.read_shard(str(tmp_path / shards.shard_name(0)))
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys)
    manifest = {"image": {"height": 8, "width": 8, "channels": 1}}
    d = shards.decode_samples(samples, *shards.image_spec(manifest), "shard-000000.tar")
    assert d.images.shape == (20, 8, 8, 1) and d.images.dtype == np.uint8
    np.testing.assert_array_equal(d.images[:, :, :, 0], src.images[:20])  # lossless
    np.testing.assert_array_equal(d.labels, src.labels[:20])


def test_bad_images_are_skipped_and_listed(image_folder, tmp_path):
    (image_folder / "dogs" / "bad.png").write_bytes(b"\x89PNG truncated")
    src = open_source(str(image_folder))
    stats = shards.write_items(src, src.plan(), str(tmp_path / "out" / shards.shard_name(0)))
    assert stats["shard"]["samples"] == 6
    assert len(stats["skipped"]) == 1 and "bad.png" in stats["skipped"][0]


def test_rank_split_covers_every_shard_once():
    uris = [f"s{i}" for i in range(7)]
    parts = [shards.rank_shards(uris, r, 3) for r in range(3)]
    assert sorted(u for p in parts for u in p) == uris
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
