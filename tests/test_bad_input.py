"""Bad input without Ray: every image mode and format, broken and hostile files, odd names, bad configs, stale shards.
Each case ends in a clear error or a counted skip (docs/RELIABILITY.md lists them)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from clustering import lease
from clustering.data import assignments, shards, storage
from clustering.config import ConfigError, LabelConfig, PipelineConfig, TrainConfig, load_config
from clustering.data.sources import BadImage, FolderSource, open_source

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


def image_of_mode(mode: str) -> Image.Image:
    """A 16x16 image whose left half is dark and right half mid-bright, in `mode`'s own value range."""
    ramp = np.zeros((16, 16), np.float64)
    ramp[:, 8:] = 0.5
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((ramp * 65535).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32), "F")
    rgb = Image.fromarray(np.repeat((ramp * 255).astype(np.uint8)[..., None], 3, axis=2), "RGB")
    if mode == "P":  # palette entry 0 (the left half) transparent
        im = Image.fromarray((ramp > 0).astype(np.uint8), "P")
        im.putpalette([0, 0, 0, 127, 127, 127])
        im.info["transparency"] = 0
        return im
    if mode in ("LA", "RGBA"):  # the left half transparent
        im = rgb.convert(mode)
        im.putalpha(Image.fromarray(np.where(ramp > 0, 255, 0).astype(np.uint8)))
        return im
    return rgb.convert(mode)


def save(im: Image.Image, path) -> None:
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(im.mode, "PNG")
    path = path.with_suffix({"JPEG": ".jpg", "TIFF": ".tif", "PNG": ".png"}[fmt])
    im.save(path, format=fmt, **({"transparency": 0} if im.mode == "P" else {}))


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_is_sharded_as_8_bit_gray_or_rgb_keeping_its_contrast(tmp_path, mode):
    save(image_of_mode(mode), tmp_path / "img")
    src = open_source(str(tmp_path))
    d = src.load(src.plan()[0])
    with Image.open(io.BytesIO(d.data)) as im:
        assert im.mode in ("L", "RGB"), im.mode
        arr = np.asarray(im.convert("L"), dtype=np.float64)
    if mode in ("LA", "P", "RGBA"):  # transparency composited onto white: the transparent half turns white
        assert arr[:, :8].min() == 255 and abs(arr[:, 8:].mean() - 127) < 2
        return
    left, right = arr[:, :8].mean(), arr[:, 8:].mean()
    assert right - left > 60, (mode, left, right)  # 16-bit and float images are scaled, not clipped to white
    if mode == "I;16":
        assert 120 < right < 136


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF", "BMP"])
def test_other_formats_are_read_and_stored_as_png(tmp_path, fmt):
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB").save(tmp_path / f"a.{fmt.lower()}", format=fmt)
    src = open_source(str(tmp_path))
    d = src.load(src.plan()[0])
    assert d.ext == "png" and (d.width, d.height) == (16, 16)


def test_broken_files_and_a_decompression_bomb_are_counted_skips(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(good)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("just some notes")
    (tmp_path / "truncated.jpg").write_bytes(open(_jpeg(tmp_path), "rb").read()[:300])
    big = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 is over twice the limit: PIL refuses it
    src = open_source(str(tmp_path))
    with pytest.raises(BadImage, match="too large to decode safely"):
        src.load(next(i for i in src.plan() if i.key == "bomb"))
    out = shards.write_items(src, src.plan(), str(tmp_path / "out" / shards.shard_name(0)))
    assert out["shard"]["samples"] == 2  # good.png and sample.jpg (under the limit)
    assert sorted(s.split(":")[0].rsplit("/", 1)[-1] for s in out["skipped"]) == [
        "bomb.png", "text.png", "truncated.jpg", "zero.jpg"]


def _jpeg(folder) -> str:
    path = folder / "sample.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    return str(path)


def test_symlink_loops_hidden_and_unicode_names(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / ".cache").mkdir()
    for path in [tmp_path / "cats" / "ein Kätzchen.png", tmp_path / "cats" / "猫.png", tmp_path / ".cache" / "x.png",
                 tmp_path / "cats" / ".hidden.png"]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    os.symlink("..", tmp_path / "cats" / "loop")  # a folder link back up: not followed, so no endless listing
    os.symlink(tmp_path / "cats" / "猫.png", tmp_path / "cats" / "link.png")  # a file link: read
    os.symlink(tmp_path / "nowhere.png", tmp_path / "cats" / "dangling.png")
    src = FolderSource(str(tmp_path))
    items = src.plan()
    assert sorted(src.hidden) == [".cache", "cats/.hidden.png"]
    assert len(items) == 4 and len({i.key for i in items}) == 4 and all(i.key.isascii() for i in items)
    out = shards.write_items(src, items, str(tmp_path / "out" / shards.shard_name(0)))
    assert out["shard"]["samples"] == 3 and len(out["skipped"]) == 1 and "dangling.png" in out["skipped"][0]


@pytest.mark.parametrize("override, message", [
    ("train.k=1", "train.k"), ("train.batch_size=0", "train.batch_size"), ("train.method.rec_weight=-1", "train.method.rec_weight"),
    ("train.method=spectral", "train.method"), ("train.name=../../x", "plain folder name"),
    ("train.name=a/b", "plain folder name"), ("label.batch_size=0", "label.batch_size"),
])
def test_bad_config_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, "configs/demo.yaml", [override])


def test_yaml_yes_no_and_empty_list_scalar_files(tmp_path, capsys):
    assert TrainConfig(use_gpu=True).use_gpu == "yes" and LabelConfig(use_gpu=False).use_gpu == "no"
    (tmp_path / "gpu.yaml").write_text("train:\n  use_gpu: yes\n")
    assert load_config(PipelineConfig, tmp_path / "gpu.yaml").train.use_gpu == "yes"
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(PipelineConfig, tmp_path / "empty.yaml") == PipelineConfig()
    assert "is empty: every setting is the default" in capsys.readouterr().err
    for text, kind in [("- a\n- b\n", "list"), ("42\n", "int")]:
        (tmp_path / "odd.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"not a {kind}"):
            load_config(PipelineConfig, tmp_path / "odd.yaml")


def test_k_or_its_fine_clusters_above_the_images_and_a_bucketless_s3_uri_are_refused():
    from jobs.train import check_run

    manifest = {"num_samples": 42, "shards": [{"name": "shard-000000.tar", "samples": 42}]}
    with pytest.raises(ValueError, match="train.k=100 is more than the 42 images"):
        check_run(TrainConfig(k=100), manifest)
    with pytest.raises(ValueError, match="more than the 30 images"):
        check_run(TrainConfig(k=40, sample=30), manifest)
    with pytest.raises(ValueError, match=r"48 fine clusters \(train.k=12 x train.over_cluster=4\), more than the 42 "
                       "images training would see: set train.over_cluster=1"):
        check_run(TrainConfig(k=12), manifest)  # nmm learns 4k fine clusters by default
    check_run(TrainConfig(k=12, over_cluster=1), manifest)
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.check_writable("s3://")


def test_shards_are_byte_reproducible_and_a_changed_shard_is_refused(tmp_path):
    samples = [{"__key__": f"k{i}", "png": _png(i), "cls": i % 2} for i in range(5)]
    a = shards.write_shard(samples, str(tmp_path / "a" / shards.shard_name(0)))
    b = shards.write_shard(list(reversed(samples)), str(tmp_path / "b" / shards.shard_name(0)))
    assert a["sha256"] == b["sha256"]
    uri = str(tmp_path / "a" / shards.shard_name(0))
    assert len(shards.read_shard(uri, a["sha256"])) == 5
    shards.write_shard(samples[:3], uri)  # rewritten after the manifest recorded it
    with pytest.raises(shards.StaleShard, match="sha256 differs"):
        shards.load_shard(uri, "L", 8, check=a["sha256"])


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, where, request):
    folder = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3') and 'dicl-test'}/lease"
    with lease.hold(folder, "first"):
        with pytest.raises(lease.Busy, match=r"in use by another run \(first, process"):
            with lease.hold(folder, "second"):
                pass
    with lease.hold(folder, "again"):  # released at the end of the block
        pass
    import json
    import socket

    dead = {"id": "x", "what": "killed run", "host": socket.gethostname(), "pid": 2**22 + 17, "beat": 0}
    storage.write_bytes(storage.join(folder, lease.LOCK), json.dumps(dead).encode())
    with lease.hold(folder, "rerun") as holder:  # the killed holder's process is gone: taken over
        assert json.loads(storage.read_bytes(storage.join(folder, lease.LOCK)))["id"] == holder
    assert not storage.exists(storage.join(folder, lease.LOCK))


def test_parts_of_another_model_are_removed_on_resume_and_refused_at_the_end(tmp_path):
    out = str(tmp_path / "assignments")
    ours = {"checkpoint": "runs/a/checkpoint_000009", "content_hash": "h1", "k": 2}
    other = {**ours, "checkpoint": "runs/b/checkpoint_000009"}
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assignments.write_part(out, 0, assignments.table(["a", "b"], "shard-000000.tar", probs), ours)
    assignments.write_part(out, 1, assignments.table(["c", "d"], "shard-000001.tar", probs), other)
    assert assignments.read(out, writer=None)["key"].tolist() == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="another run wrote into"):
        assignments.read(out, writer=ours)
    kept = assignments.start_run(out, ours)
    assert [shards.name_of(p) for p in kept] == ["part-000000.parquet"]
    assert assignments.read(out, writer=ours)["key"].tolist() == ["a", "b"]


def test_a_key_with_a_double_slash_on_s3_is_a_counted_skip(s3, image_folder):
    from tests.conftest import BUCKET

    png = next(image_folder.rglob("*.png")).read_bytes()
    storage.write_bytes(f"s3://{BUCKET}/slashes/ok.png", png)
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.pipe_file(f"{BUCKET}/slashes/a//odd.png", png)  # storage.join would collapse the '//'
    src = open_source(f"s3://{BUCKET}/slashes")
    assert [i.key for i in src.plan()] == ["ok"]
    assert len(src.unlisted) == 1 and "'//'" in src.unlisted[0]  # the shard job lists it among the skipped


def test_a_model_of_another_side_or_channels_or_with_empty_clusters_labels_with_a_warning():
    from jobs.label import cluster_warnings, input_warnings

    assert cluster_warnings({0: 5, 1: 3}, 2) == []
    assert "only 26 of the model's 100 clusters hold an image" in cluster_warnings(dict.fromkeys(range(26), 1), 100)[0]

    manifest, nmm = {"image": {"side": 32, "channels": 3}}, {"method": "nmm"}
    assert input_warnings({"side": 32, "channels": 3, "config": nmm}, manifest) == []
    [warning] = input_warnings({"side": 8, "channels": 1, "config": nmm}, manifest)
    assert "trained at 8x8 gray" in warning and "32x32 RGB" in warning
    # dcec's conv autoencoder trains 8x8 images enlarged to 16x16: the same corpus is no other side
    digits = {"image": {"side": 8, "channels": 1}}
    assert input_warnings({"side": 16, "channels": 1, "config": {"method": "dcec"}}, digits) == []
    assert input_warnings({"side": 16, "channels": 1, "config": nmm}, digits) != []
