import numpy as np

from clustering.data import shards
from clustering.data.sources import open_source


def test_plan_respects_count_and_bytes():
    from clustering.data.sources import Item

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


def webdataset_samples():
    """Samples as the shard job makes them, with a key long and non-ASCII enough for a PAX header."""
    long_key = "photos/" + "é" * 60 + "/x" * 30
    return [{"__key__": k, "png": bytes([i]) * (100 + i), "json": {"source": f"/in/{k}.png", "width": 2}, "cls": i}
            for i, k in enumerate(["b/two", "a/one", long_key])]


def test_shards_are_webdatasets_byte_for_byte(tmp_path):
    """The shard writer uses tarfile (so its tasks never import webdataset, and torch); its bytes are still those
    of webdataset's TarWriter, and webdataset's own reader groups them into the same samples."""
    import io

    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    samples = webdataset_samples()
    ours = tmp_path / shards.shard_name(0)
    shards.write_shard(samples, str(ours))
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as sink:
        for s in sorted(samples, key=lambda s: s["__key__"]):
            sink.write(s)
    assert ours.read_bytes() == buf.getvalue()
    theirs = list(group_by_keys({**f, "__url__": str(ours)} for f in tar_file_iterator(io.BytesIO(buf.getvalue()))))
    assert shards.read_shard(str(ours)) == theirs and len(theirs) == 3


def test_tars_of_any_format_group_like_webdataset(tmp_path):
    """Tars written elsewhere: GNU long names and PAX headers (the fast reader), and members the fast reader does
    not know (a symlink: Python's tarfile reads the rest). Keys end at the first dot of the file name."""
    import io
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    for fmt, extra in [(tarfile.GNU_FORMAT, False), (tarfile.PAX_FORMAT, False), (tarfile.PAX_FORMAT, True)]:
        path = tmp_path / f"f{fmt}{extra}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in [("d/" + "k" * 120 + ".png", b"img"), ("d/" + "k" * 120 + ".cls", b"3"),
                               ("d/x.y.jpg", b"jj"), ("d/x.y.json", b"{}"), ("d/z.PNG", b"p")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if extra:
                link = tarfile.TarInfo("d/link.png")
                link.type, link.linkname = tarfile.SYMTYPE, "d/z.PNG"
                tar.addfile(link)
        got = shards.read_shard(str(path))
        data = path.read_bytes()
        want = list(group_by_keys({**f, "__url__": str(path)} for f in tar_file_iterator(io.BytesIO(data))))
        assert [s["__key__"] for s in got] == ["d/" + "k" * 120, "d/x", "d/z"]
        assert got == [s for s in want if s["__key__"] != "d/link"]  # webdataset reads a link's empty body
        assert got[1]["y.jpg"] == b"jj" and got[2]["png"] == b"p"  # lower-cased extension, as webdataset


def test_decode_and_shard_tasks_import_no_torch():
    """Ray imports a task's module in every worker: the decoding and shard-writing tasks stay light."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, jobs.decode, jobs.shard; print(sorted({'torch', 'webdataset', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
