"""WebDataset corpora read where they lie: img2dataset-style tars (jpg + json + txt, written here with webdataset's
TarWriter) indexed by the shard job and trained on and labelled in place, locally, from an S3 prefix and a brace
pattern; and what a broken corpus gets."""
import io
import json
import os
import time

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clustering import assignments, corpus, shards, storage
from jobs.cli import main

from conftest import BUCKET

SMALL = ["train.joint_epochs=2", "train.cpus_per_worker=1", "train.checkpoint_every=1", "--no-progress"]


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).resize((16, 16), Image.NEAREST).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_corpus(folder, tars: int = 4, per_tar: int = 120, start: int = 0, extra: dict | None = None) -> list[str]:
    """img2dataset's layout: 00000.tar ... with KEY.jpg, KEY.json (url, key) and KEY.txt (a caption) per sample,
    keys numbered across the corpus. Returns the keys of the samples that have an image."""
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    keys, i = [], start
    for t in range(tars):
        with wds.TarWriter(os.path.join(folder, f"{t:05d}.tar")) as sink:
            for _ in range(per_tar):
                key = f"{i:09d}"
                sink.write({"__key__": key, "jpg": jpeg(images[i % len(images)]), "txt": f"digit {i}",
                            "json": {"url": f"https://example.com/img/{i}.jpg", "key": key}})
                keys.append(key)
                i += 1
            for sample in (extra or {}).get(t, []):
                sink.write(sample)
    return keys


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def tars_under(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".tar")]


def test_an_img2dataset_corpus_goes_through_the_pipeline_in_place(ray_local, tmp_path, capsys):
    src, work = tmp_path / "laion", tmp_path / "work"
    keys = write_corpus(src, extra={1: [{"__key__": "000000999x", "txt": "a caption, no image"}]})
    code, out, err = run(capsys, "pipeline", "configs/demo.yaml", f"shard.source={src}", f"work_dir={work}", *SMALL)
    assert code == 0, err
    assert "indexed 480 samples in 4 tars" in out and "not copied" in out
    assert not tars_under(work)  # nothing copied: the tars are read where they lie
    manifest = shards.read_manifest(str(work / "shards"))
    assert manifest["layout"] == "webdataset" and [s["name"] for s in manifest["shards"]] == [f"{t:05d}.tar" for t in range(4)]
    assert manifest["skipped"]["count"] == 1 and "000000999x: no image member" in manifest["skipped"]["examples"][0]
    assert manifest["image"]["side"] == 16 and manifest["image"]["channels"] == 1

    table = assignments.read(str(work / "assignments"))
    assert sorted(table["key"]) == sorted(keys) and table["key"].is_unique  # every sample once, by its own key
    urls = dict(zip(table["key"], table["source"]))
    assert all(urls[k] == f"https://example.com/img/{int(k)}.jpg" for k in keys)
    assert set(table["shard"]) == {f"{t:05d}.tar" for t in range(4)}
    success = json.loads(storage.read_bytes(str(work / "assignments" / assignments.SUCCESS)))
    full = table["cluster"].value_counts()  # the counts from footers alone equal a full read of the parts
    assert success["rows"] == len(table) == 480 and success["counts"] == {str(k): int(v) for k, v in full.sort_index().items()}


def test_a_corpus_in_s3_by_prefix_and_by_brace_pattern(ray_local, s3, tmp_path, capsys):
    local = tmp_path / "tars"
    keys = write_corpus(local, tars=3, per_tar=40)
    fs, _ = storage.filesystem(f"s3://{BUCKET}/x")
    for name in sorted(os.listdir(local)):
        fs.put_file(str(local / name), f"{BUCKET}/corpus/{name}")
    work = f"s3://{BUCKET}/corpus-run"
    code, out, err = run(capsys, "pipeline", "configs/demo.yaml", f"shard.source=s3://{BUCKET}/corpus/",
                         f"work_dir={work}", *SMALL)
    assert code == 0, err
    manifest = shards.read_manifest(f"{work}/shards")
    assert all("etag" in s["fingerprint"] for s in manifest["shards"])
    table = assignments.read(f"{work}/assignments")
    assert sorted(table["key"]) == keys and set(table["shard"]) == {"00000.tar", "00001.tar", "00002.tar"}
    assert not [u for u in storage.list_files(work, ".tar")]

    # Two of the three tars by a brace pattern, labelled with the run's model: only their samples.
    pattern = f"s3://{BUCKET}/corpus/{{00001..00002}}.tar"
    code, out, err = run(capsys, "shard", f"shard.source={pattern}", f"shard.output={work}/two")
    assert code == 0, err
    code, out, err = run(capsys, "label", f"label.shards={work}/two", f"label.output={work}/two-labels",
                         f"train.storage_path={work}/runs", "--no-progress")
    assert code == 0, err
    two = assignments.read(f"{work}/two-labels")
    assert sorted(two["key"]) == keys[40:] and two["key"].is_unique


def test_a_broken_corpus_gets_a_counted_skip_or_a_clear_error(ray_local, tmp_path, capsys):
    # A duplicate key across two tars: refused, naming both.
    dup = tmp_path / "dup"
    write_corpus(dup, tars=2, per_tar=10)
    with wds.TarWriter(str(dup / "00002.tar")) as sink:
        sink.write({"__key__": "000000003", "jpg": jpeg(np.zeros((8, 8), np.uint8))})
    code, out, err = run(capsys, "shard", f"shard.source={dup}", f"shard.output={tmp_path}/o1")
    assert code == 2 and "'000000003'" in err and "00000.tar" in err and "00002.tar" in err, err

    # Key ranges that overlap without a shared key are not a clash (the overlapping tars' keys are compared).
    interleaved = tmp_path / "interleaved"
    write_corpus(interleaved, tars=1, per_tar=10)
    with wds.TarWriter(str(interleaved / "00001.tar")) as sink:
        sink.write({"__key__": "000000004a", "jpg": jpeg(np.zeros((8, 8), np.uint8))})
    code, out, err = run(capsys, "shard", f"shard.source={interleaved}", f"shard.output={tmp_path}/o2")
    assert code == 0 and "indexed 11 samples in 2 tars" in out, err

    # A truncated tar: its samples are skipped, counted and named with what to do; the others are indexed.
    cut = tmp_path / "cut"
    write_corpus(cut, tars=3, per_tar=10)
    whole = (cut / "00001.tar").read_bytes()
    (cut / "00001.tar").write_bytes(whole[: len(whole) // 2])
    code, out, err = run(capsys, "shard", f"shard.source={cut}", f"shard.output={tmp_path}/o3")
    assert code == 0, err
    manifest = shards.read_manifest(f"{tmp_path}/o3")
    assert manifest["num_samples"] == 20 and [s["name"] for s in manifest["shards"]] == ["00000.tar", "00002.tar"]
    assert manifest["skipped"]["count"] == 1 and "00001.tar: cut short" in manifest["skipped"]["examples"][0]
    assert "Download or copy it again" in manifest["skipped"]["examples"][0] and "skipped 1" in out

    # A sample whose image member does not decode: left out where it is read, and counted.
    entry = manifest["shards"][0]
    samples = shards.read_shard(shards.shard_uri("", entry), shards.check_of(entry))
    samples[3]["jpg"] = b"\xff\xd8\xff not a jpeg"
    decoded = shards.decode_samples(samples, "L", 16, entry["name"])
    assert len(decoded.keys) == 9 and "000000003: not a readable image" in decoded.skipped[0]

    # A tar rewritten after indexing: refused by every reader, saying to re-index.
    time.sleep(0.01)
    (cut / "00002.tar").write_bytes((cut / "00002.tar").read_bytes())  # same bytes, new mtime: a rewrite
    with pytest.raises(corpus.CorpusError, match="changed after the corpus was indexed.*re-index it with dicl shard"):
        shards.read_shard(str(cut / "00002.tar"), manifest["shards"][1]["fingerprint"])


def test_header_walk_agrees_with_webdataset(tmp_path):
    """The index reads headers only; its samples and keys are the ones webdataset's own reader yields."""
    keys = write_corpus(tmp_path, tars=1, per_tar=30, extra={0: [{"__key__": "z/long/" + "n" * 120, "png": b"x"}]})
    entry = corpus.index_tar(str(tmp_path / "00000.tar"))
    read = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)]
    assert read == keys + ["z/long/" + "n" * 120] and entry["samples"] == 31
    assert entry["first_key"] == keys[0] and entry["images"] == {"jpg": 30, "png": 1}
    assert [s["__key__"] for s in shards.read_shard(str(tmp_path / "00000.tar"), entry["fingerprint"])] == read
