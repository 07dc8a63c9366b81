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

from clustering.data import assignments, corpus, shards, storage
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


def test_an_img2dataset_corpus_goes_through_the_pipeline_in_place_locally_on_s3_and_by_pattern(ray_local, s3, tmp_path,
                                                                                                capsys):
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

    # The same tars from an S3 prefix, then two of them by a brace pattern: indexed in place and labelled with the
    # run's model (its training on tars is above), every sample once.
    fs, _ = storage.filesystem(f"s3://{BUCKET}/x")
    for name in sorted(os.listdir(src)):
        fs.put_file(str(src / name), f"{BUCKET}/corpus/{name}")
    remote = f"s3://{BUCKET}/corpus-run"
    run_dir = str(work / "runs")
    for spec, want in [(f"s3://{BUCKET}/corpus/", keys), (f"s3://{BUCKET}/corpus/{{00001..00002}}.tar", keys[120:360])]:
        code, out, err = run(capsys, "shard", f"shard.source={spec}", f"shard.output={remote}/shards", "--no-progress")
        assert code == 0, err
        manifest = shards.read_manifest(f"{remote}/shards")
        assert all("etag" in s["fingerprint"] and s["uri"].startswith("s3://") for s in manifest["shards"])
        code, out, err = run(capsys, "label", f"label.shards={remote}/shards", f"label.output={remote}/labels",
                             f"train.storage_path={run_dir}", "--no-progress")
        assert code == 0, err
        table = assignments.read(f"{remote}/labels")
        assert sorted(table["key"]) == want and table["key"].is_unique
    assert not storage.list_files(f"{remote}/shards", ".tar")
    # dicl predict takes the same brace pattern (in this process, no manifest)
    from clustering.checkpoints import latest_finished

    code, out, err = run(capsys, "predict", latest_finished(run_dir), f"s3://{BUCKET}/corpus/{{00001..00002}}.tar",
                         f"predict.output={tmp_path}/predicted", "--no-progress")
    assert code == 0, err
    assert sorted(assignments.read(str(tmp_path / "predicted"))["key"]) == keys[120:360]


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

    # A truncated tar, and one with a damaged header: their samples are skipped, counted and named with what to do;
    # the others are indexed.
    cut = tmp_path / "cut"
    write_corpus(cut, tars=4, per_tar=10)
    whole = (cut / "00001.tar").read_bytes()
    (cut / "00001.tar").write_bytes(whole[: len(whole) // 2])
    damaged = bytearray((cut / "00003.tar").read_bytes())
    damaged[damaged.index(b"000000031.jpg\0") + 3] ^= 0x01  # in a later member's header name: its checksum fails
    (cut / "00003.tar").write_bytes(bytes(damaged))
    code, out, err = run(capsys, "shard", f"shard.source={cut}", f"shard.output={tmp_path}/o3")
    assert code == 0, err
    manifest = shards.read_manifest(f"{tmp_path}/o3")
    assert manifest["num_samples"] == 20 and [s["name"] for s in manifest["shards"]] == ["00000.tar", "00002.tar"]
    why = manifest["skipped"]["examples"]
    assert manifest["skipped"]["count"] == 2 and "00001.tar: cut short" in why[0] and "00003.tar: damaged" in why[1]
    assert "Download or copy it again" in why[0] and "skipped 2" in out

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


def test_tars_in_place_train_streamed_and_on_a_sample_split_by_rank(ray_local, tmp_path):
    from clustering.data import inputs
    from clustering.comm import Comm
    from clustering.config import ShardConfig, TrainConfig
    from jobs.shard import run_shard

    keys = write_corpus(tmp_path / "tars", tars=3, per_tar=50)
    manifest = run_shard(ShardConfig(source=str(tmp_path / "tars"), output=str(tmp_path / "index")), progress=False)
    base = dict(shards=str(tmp_path / "index"), loader_workers=0, shuffle_buffer=16)
    halves = [inputs.open_input(TrainConfig(**base, input="memory"), manifest, Comm(r, 2), "cpu", log=lambda s: None)
              for r in range(2)]
    assert [h.n for h in halves] == [100, 50] and halves[0].sample.shape == (100, 1, 16, 16)  # 2 tars, 1 tar
    sampled = inputs.open_input(TrainConfig(**base, input="memory", sample=40), manifest, Comm(0, 1), "cpu",
                                log=lambda s: None)
    assert sampled.n == 40
    stream = inputs.open_input(TrainConfig(**base, input="stream", sample=60, stats_sample=100), manifest, Comm(0, 1),
                               "cpu", log=lambda s: None)
    batches = [x for x, _ in stream.batches(0, 5, 32, seed=0, rank=0)]
    assert stream.n == 60 and len(batches) == 5 and all(x.shape == (32, 1, 16, 16) for x in batches)
    stream.close()
    assert len(keys) == 150


def test_header_walk_agrees_with_webdataset(tmp_path):
    """The index reads headers only; its samples and keys are the ones webdataset's own reader yields."""
    keys = write_corpus(tmp_path, tars=1, per_tar=30, extra={0: [{"__key__": "z/long/" + "n" * 120, "png": b"x"}]})
    entry = corpus.index_tar(str(tmp_path / "00000.tar"))
    read = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)]
    assert read == keys + ["z/long/" + "n" * 120] and entry["samples"] == 31
    assert entry["first_key"] == keys[0] and entry["images"] == {"jpg": 30, "png": 1}
    assert [s["__key__"] for s in shards.read_shard(str(tmp_path / "00000.tar"), entry["fingerprint"])] == read
