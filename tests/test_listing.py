"""The shard job lists a folder tree in Ray tasks and keeps its plan in storage (the driver holds no file list), and
stores images at the training input when asked (shard.store=resized)."""
import io
import json
import os

import numpy as np
from PIL import Image

from clustering import DeepClusterer, metrics
from clustering.data import shards, storage
from clustering.config import ShardConfig
from clustering.data.sources import FolderSource


def tree(root, rng) -> None:
    """Files at the top, in class folders, in nested folders, in two folders whose names sanitise alike, hidden ones,
    and a.jpg beside a.png (keys that clash)."""
    files = ["top1.png", "top2.jpg", "cats/c1.png", "cats/deep/c2.png", "dogs/d1.jpg", "dogs/a.png", "dogs/a.jpg",
             "a b/x.png", "a_b/x.png", ".hidden/h.png", "cats/.DS_Store", "notes.txt"]
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith((".png", ".jpg")):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
        else:
            path.write_bytes(b"x")


def test_a_folder_listed_in_tasks_gives_the_keys_labels_and_counts_of_one_listing(ray_local, tmp_path):
    from jobs.shard import run_shard

    tree(tmp_path / "src", np.random.default_rng(0))
    out = tmp_path / "shards"
    manifest = run_shard(ShardConfig(source=str(tmp_path / "src"), output=str(out), samples_per_shard=3), progress=False)
    assert not (out / "_plan").exists()  # the plan's parts are removed once the shards are written
    got = {}
    for entry in manifest["shards"]:
        for s in shards.read_shard(str(out / entry["name"]), entry["sha256"]):
            got[s["__key__"]] = (int(s["cls"]) if "cls" in s else None, json.loads(s["json"])["source"])
    here = FolderSource(str(tmp_path / "src"))  # the same tree listed in one process
    want = {it.key: (it.label, os.path.abspath(str(it.ref))) for it in here.plan()}
    assert got == want and len(got) == 9
    assert manifest["classes"] == here.classes and manifest["num_samples"] == 9
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3]
    assert manifest["hidden"]["count"] == 2 and sorted(manifest["hidden"]["examples"]) == [".hidden", "cats/.DS_Store"]


def test_a_plan_in_parts_is_cut_into_runs_that_span_parts():
    from jobs.shard import plan_runs

    runs = plan_runs([("a", 5), ("b", 0), ("c", 4)], 8, 3)  # the first 8 of 9 files (shard.limit), 3 a shard
    assert runs == [(3, [("a", 0, 3)]), (3, [("a", 3, 5), ("b", 0, 0), ("c", 0, 1)]), (2, [("c", 1, 3)])]


def test_resized_shards_hold_the_training_input_and_cluster_as_the_originals(ray_local, tmp_path, capsys):
    from jobs.shard import describe, run_shard
    from sklearn.datasets import load_digits

    d = load_digits()
    src = tmp_path / "digits"
    src.mkdir()
    for i, img in enumerate(np.round(d.images * (255 / 16)).astype(np.uint8)):  # 8x8 -> 32x32 PNG files
        Image.fromarray(img).resize((32, 32), Image.BILINEAR).save(src / f"{i:04d}.png")
    photo = io.BytesIO()
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(photo, format="JPEG")
    (src / "cut.jpg").write_bytes(photo.getvalue()[:400])  # a JPEG cut short: a counted skip in either store
    kept = run_shard(ShardConfig(source=str(src), output=str(tmp_path / "orig"), samples_per_shard=500), progress=False)
    small = run_shard(ShardConfig(source=str(src), output=str(tmp_path / "small"), samples_per_shard=500,
                                  store="resized", image_size=16), progress=False)
    assert small["image"]["side"] == 16 and kept["image"]["side"] == 32
    assert kept["skipped"]["count"] == small["skipped"]["count"] == 1 and "cut.jpg" in small["skipped"]["examples"][0]
    assert small["store"]["image_bytes"] < 0.6 * kept["store"]["image_bytes"] and small["store"]["bytes"] < kept["store"]["bytes"]
    assert small["store"]["original_bytes"] == kept["store"]["original_bytes"] == kept["store"]["image_bytes"]
    text = describe(small, str(tmp_path / "small"))
    assert "stored resized at up to 16 px" in text and "originals hold" in text
    assert "shard.store=resized would store" in describe(kept, str(tmp_path / "orig"))
    first = shards.read_shard(str(tmp_path / "small" / small["shards"][0]["name"]))[0]
    meta = json.loads(first["json"])
    assert meta["source"].endswith(f"digits/{first['__key__']}.png") and meta["original_width"] == 32

    # The training input at 16 px is the same pixels either way: the policy applied once, or at every read.
    a = shards.load_shards(shards.shard_uris(str(tmp_path / "orig"), kept), kept, side=16)
    b = shards.load_shards(shards.shard_uris(str(tmp_path / "small"), small), small)
    assert a.keys == b.keys and np.array_equal(a.images, b.images)
    truth = d.target[[int(k) for k in a.keys]]  # the files are named by their row of the digits
    scores = [metrics.scores(truth, DeepClusterer("kmeans", k=10, seed=0).fit(x.images).predict(x.images))["acc"]
              for x in (a, b)]
    assert abs(scores[0] - scores[1]) <= 0.02 and scores[0] > 0.6
    assert storage.exists(str(tmp_path / "small" / shards.MANIFEST))
