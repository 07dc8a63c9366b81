"""The Python API (DeepClusterer) and `dicl predict`, in one process without Ray; the CLI's help and config."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError

from clustering import DeepClusterer, metrics
from clustering.data import assignments, storage
from clustering.config import ConfigError
from jobs.cli import main


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target


@pytest.fixture(scope="module")
def kmeans_model(digits, tmp_path_factory):
    """A fitted model that costs nothing to train (k-means on pixels), saved as a checkpoint."""
    est = DeepClusterer("kmeans", k=10).fit(digits[0])
    return est, est.save(str(tmp_path_factory.mktemp("ckpt") / "checkpoint_000000"))


def test_fit_predict_save_load(digits, tmp_path):
    x, y = digits
    est = DeepClusterer("nmm", k=10, joint_epochs=8, batch_size=256, seed=0).fit(x)
    assert est.labels_.shape == (1797,) and est.image_size_ == 8 and est.channels_ == 1 and len(est.history_) == 8
    assert metrics.cluster_acc(y, est.labels_) > 0.6  # a model that learned nothing scores ~0.2
    probs = est.predict_proba(x[:50])
    assert probs.shape == (50, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (est.predict(x) == est.labels_).all() and est.transform(x[:5]).shape[0] == 5
    # A run folder (the newest checkpoint_* in it) loads like the train job's; predictions are the same.
    est.save(str(tmp_path / "run" / "checkpoint_000007"))
    again = DeepClusterer.load(str(tmp_path / "run"))
    assert (again.predict(x) == est.labels_).all() and again.method == "nmm" and again.n_clusters == 10
    # Every accepted kind of image gives the same answer: floats in 0..1, PIL images, files, encoded bytes.
    paths = []
    for i in range(4):
        Image.fromarray(x[i]).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    for images in (x[:4] / 255.0, [Image.fromarray(a) for a in x[:4]], paths, [open(p, "rb").read() for p in paths]):
        assert (again.predict(images) == est.labels_[:4]).all()


def test_dcec_trains_small_images_enlarged_and_predicts_on_them_as_given(digits):
    x, _ = digits
    est = DeepClusterer("dcec", k=4, over_cluster=1, pretrain_epochs=1, joint_epochs=1, seed=0).fit(x[:200])
    assert est.image_size_ == 16 and est.pixels(x[:3]).shape == (3, 16, 16, 1)
    assert (est.predict(x[:200]) == est.labels_).all()


def test_api_errors(digits):
    with pytest.raises(NotFittedError, match="not fitted"):
        DeepClusterer().predict(digits[0][:2])
    with pytest.raises(ConfigError, match="joint_epoch"):
        DeepClusterer("nmm", joint_epoch=3).fit(digits[0][:20])
    with pytest.raises(ConfigError, match="'heads' is not a setting of method dcec"):  # nmm's, not dcec's
        DeepClusterer("dcec", heads=2).fit(digits[0][:20])
    with pytest.raises(ValueError, match="n_samples=5 images, and n_clusters=10"):
        DeepClusterer("kmeans", k=10).fit(digits[0][:5])


def test_photos_of_any_size_follow_the_policy(tmp_path):
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)) for h, w in [(40, 60), (52, 48), (44, 44)] * 4]
    est = DeepClusterer("kmeans", k=3).fit(photos)
    assert est.image_size_ == 44 and est.channels_ == 3  # the median shorter side, a multiple of 4
    assert est.predict(photos).shape == (12,)


def foreign_tar(path, images):
    """A WebDataset tar as another tool writes it: jpg members, no json, no manifest."""
    with wds.TarWriter(str(path)) as sink:
        for i, a in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG")
            sink.write({"__key__": f"sample{i:04d}", "jpg": buf.getvalue()})


def test_predict_command(kmeans_model, digits, tmp_path, capsys):
    est, ckpt = kmeans_model
    x = digits[0]
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(x[i]).resize((16, 16)).save(photos / "a" / f"p{i}.png")
    (photos / "a" / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(x[10]).save(tmp_path / "one.png")
    tars = tmp_path / "tars"
    tars.mkdir()
    foreign_tar(tars / "x-0.tar", x[20:25])
    out = tmp_path / "pred"
    args = ["predict", ckpt, str(photos), str(tmp_path / "one.png"), str(tars), f"predict.output={out}",
            "predict.images_per_part=4", "--no-progress"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "predicted 12 images" in said and "skipped 1" in said
    table = assignments.read(str(out))
    assert len(table) == 12 and table["key"].is_unique
    assert set(table.columns) >= {"key", "source", "shard", "cluster", "confidence", "probs"}
    by_source = table.set_index("source")
    assert by_source.loc[str(tmp_path / "one.png"), "cluster"] == est.predict(x[10:11])[0]
    assert by_source.loc[str(photos / "a" / "p0.png"), "key"] == "a/p0"
    tar_rows = table[table["shard"] == "x-0.tar"]
    assert sorted(tar_rows["source"]) == [f"{tars / 'x-0.tar'}#sample{i:04d}" for i in range(5)]
    meta = assignments.part_writer(storage.list_files(str(out), ".parquet")[0])
    assert meta["method"] == "kmeans" and meta["k"] == 10 and meta["image_size"] == 8 and meta["checkpoint"] == ckpt
    success = json.loads((out / assignments.SUCCESS).read_text())
    assert success["rows"] == 12 and success["skipped"]["count"] == 1

    # A re-run with the same model and inputs keeps every part (none is rewritten).
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before

    assert main(["predict", ckpt]) == 2
    assert "needs a run or checkpoint folder, then one or more inputs" in capsys.readouterr().err
    assert main(["predict", ckpt, str(tmp_path / "nothing-here.png"), f"predict.output={out}2"]) == 2


def test_cli_help_and_config(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "usage: dicl train" in text and "train.k (int) = 10" in text and "label.batch_size" not in text
    assert main(["config", f"work_dir={tmp_path}", "train.k=7"]) == 0
    text = capsys.readouterr().out
    assert "train.k (int) = 7   [default 10]" in text and f"label.output (str) = {tmp_path}/assignments" in text
    assert "predict.images_per_part" in text and "number of clusters" in text
    for command, ray in [("pipeline", True), ("predict", False), ("config", False)]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert ("--address" in text) == ray, command  # predict and config start no Ray
    assert len(text.splitlines()) > 100 and "train.method.heads" in text  # config --help: every key's meaning
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert len(capsys.readouterr().out.splitlines()) < 60  # every key by name; meanings one command away
    assert main(["config", "train.method=vc"]) == 0  # a method other than the default is marked, as any key is
    assert "train.method (nmm|dcec|vc|idec|dec|ae_kmeans|kmeans|iic) = vc   [default nmm]" in capsys.readouterr().out
    assert main(["config", "train.kk=7"]) == 2
    assert main(["config", "not-an-override"]) == 2
    assert "neither a YAML config nor a key=value" in capsys.readouterr().err


def test_source_column_in_parts(tmp_path):
    probs = np.eye(3, dtype=np.float32)
    tbl = assignments.table(["a", "b", "c"], "shard-000000.tar", probs, sources=["s3://b/a.jpg", "x", "y"])
    uri = assignments.write_part(str(tmp_path), 0, tbl, {"checkpoint": "c", "content_hash": "h"})
    got = pq.read_table(uri)
    assert got["source"].to_pylist() == ["s3://b/a.jpg", "x", "y"] and got.column_names[:3] == ["key", "source", "shard"]


def test_fit_reads_paths_bytes_pil_images_and_arrays_alike(digits, tmp_path):
    """Every input form of the README gives the same model: files are read once (their shape, then their pixels),
    and the caller's PIL images stay open."""
    x = digits[0][:120]
    paths = []
    for i, a in enumerate(x):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    pil = [Image.open(p) for p in paths]
    forms = {"paths": paths, "bytes": [open(p, "rb").read() for p in paths], "pil": pil, "arrays": list(x),
             "array": x}
    labels = {name: DeepClusterer("kmeans", k=4).fit(form).labels_ for name, form in forms.items()}
    assert all(np.array_equal(labels["array"], got) for got in labels.values()), labels
    assert pil[0].load() is not None  # still open
    est = DeepClusterer("kmeans", k=4).fit(x)
    assert est.predict(x[0]).shape == (1,) and est.predict(paths[0]) == est.predict(pil[0]) == est.predict(x[0])


@pytest.mark.parametrize("images, message", [
    ([], "no images given"),
    (np.full((10, 8, 8), np.nan), "10 of 10 images hold NaN or infinite values"),
    (np.where(np.arange(10)[:, None, None] == 3, np.inf, np.zeros((10, 8, 8))), "1 of 10 images .* image 3"),
    ([object()], "an image must be an array, a PIL image"),
])
def test_inputs_that_cannot_be_images_are_refused_naming_what_was_found(images, message):
    with pytest.raises(ValueError, match=message):
        DeepClusterer("kmeans", k=2).fit(images)


def test_predict_counts_what_it_leaves_out_and_refuses_a_key_given_twice(kmeans_model, digits, tmp_path, capsys):
    """Hidden files and a named pipe in a folder are counted skips (the pipe would block a read); a damaged tar is
    a counted skip naming it; two inputs that give the same key are refused, naming both."""
    import os

    _, ckpt = kmeans_model
    x = digits[0]
    folder = tmp_path / "dir"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(x[i]).save(folder / f"img_{i:04d}.png")
    Image.fromarray(x[9]).save(folder / ".hidden.png")
    os.mkfifo(folder / "pipe.png")
    damaged = tmp_path / "damaged.tar"
    foreign_tar(damaged, x[20:23])
    raw = bytearray(damaged.read_bytes())
    raw[124:136] = b"zzzzzzzzzzz\0"  # the first member's size field: not octal
    damaged.write_bytes(bytes(raw))
    out = tmp_path / "pred"
    assert main(["predict", ckpt, str(folder), str(damaged), f"predict.output={out}", "--no-progress"]) == 0
    said = capsys.readouterr().out
    success = json.loads((out / assignments.SUCCESS).read_text())
    assert success["rows"] == 4 and success["skipped"]["count"] == 3, success
    examples = " ".join(success["skipped"]["examples"])
    assert ".hidden.png: a hidden file" in examples and "pipe.png: not a regular file" in examples
    assert f"{damaged} is not a whole tar" in examples and "skipped 3 inputs" in said

    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(x[5]).save(other / "img_0000.png")
    code = main(["predict", ckpt, str(folder), str(other / "img_0000.png"), f"predict.output={tmp_path}/p2"])
    err = capsys.readouterr().err
    assert code == 2 and "two inputs give the key 'img_0000'" in err and str(other / "img_0000.png") in err, err
    assert not (tmp_path / "p2" / "_LOCK.json").exists()


def test_an_unfinished_run_or_an_empty_newest_checkpoint_falls_back_to_the_newest_whole_one(kmeans_model, tmp_path):
    """A run killed while writing a checkpoint leaves its folder empty: the run resolves to its newest whole one, and
    the label job's choice of the latest finished run passes over runs with nothing whole."""
    from clustering import checkpoints

    est, _ = kmeans_model
    runs = tmp_path / "runs"
    whole = est.save(str(runs / "done" / "checkpoint_000003"))
    (runs / "done" / "checkpoint_000004").mkdir()  # newest, empty
    (runs / "killed" / "checkpoint_000000").mkdir(parents=True)  # a newer run with nothing whole
    assert checkpoints.resolve(str(runs / "done")) == whole
    assert checkpoints.latest_finished(str(runs)) == whole
    with pytest.raises(FileNotFoundError, match="no checkpoint_\\* folder with one"):
        checkpoints.resolve(str(runs / "killed"))
