"""Corpus scale through a real local Ray: train.sample, photos of any size (streaming on 2 workers: test_distributed)."""
import io

import numpy as np
import pytest
from PIL import Image

from clustering.data import assignments, shards
from clustering.data.sources import open_source
from jobs.cli import main


def photo_folder(root):
    """Real JPEGs of seven sizes and aspect ratios, RGB and gray mixed: bright discs and dark bars on noise."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 40), (64, 64), (100, 50), (24, 36), (50, 120), (33, 33)]  # (width, height)
    for i in range(42):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        shape = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2 if i % 2 else abs(xx - w / 2) < w / 8
        img = rng.integers(0, 60, (h, w, 3)) + (np.array([200, 180, 40]) if i % 2 else 120) * shape[..., None]
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        (im.convert("L") if i % 3 == 0 else im).save(root / f"photo_{i:02d}.jpg", quality=90)
    return root


def test_photos_of_any_size_run_the_pipeline_and_a_sample_trains_while_all_are_labelled(ray_local, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    folder = photo_folder(tmp_path / "photos")
    work = tmp_path / "run"
    code = main(["pipeline", "configs/demo.yaml", f"work_dir={work}", f"shard.source={folder}", "train.k=2",
                 "train.sample=30", "train.joint_epochs=3", "train.checkpoint_every=3", "train.name=p",
                 "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    manifest = shards.read_manifest(f"{work}/shards")
    assert len({size for size, mode, n in manifest["shapes"]["most_common"]}) == 7
    assert set(manifest["shapes"]["modes"]) == {"L", "RGB"}
    side = manifest["image"]["side"]
    assert side == 32 and manifest["image"]["channels"] == 3  # the median shorter side 33, to a multiple of 4; 28 RGB
    assert f"training input {side}x{side} RGB" in out

    table = assignments.read(f"{work}/assignments")
    assert sorted(table["key"]) == sorted(it.key for it in open_source(str(folder)).plan())  # each exactly once
    from clustering.checkpoints import load as load_checkpoint

    state = load_checkpoint(str(max((work / "runs" / "p").glob("checkpoint_0*"))))
    assert state["spec"]["side"] == side
    assert all(m["local_samples"] == 30 for m in state["history"])  # trained on the sample
    assert "Input policy" in (work / "report" / "index.html").read_text()


def test_the_input_policy_crops_the_centre_square_of_the_shorter_side():
    # a 60x20 image whose middle 20x20 is white and whose sides are black: the crop keeps the white (a squash
    # to 10x10 would keep a third of it)
    img = np.zeros((20, 60), np.uint8)
    img[:, 20:40] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = shards.decode_image(buf.getvalue(), "L", 10)
    assert out.shape == (10, 10, 1) and out[:, 1:-1].min() == 255 and out.mean() > 240
    rgb = shards.decode_image(buf.getvalue(), "RGB", 10)
    assert rgb.shape == (10, 10, 3)


def test_a_sample_is_uniform_seeded_and_spans_every_shard():
    manifest = {"shards": [{"name": f"s{i}", "samples": n} for i, n in enumerate([1000, 10, 3000, 500])]}
    picked = shards.sample_members(manifest, 450, seed=3)
    assert sum(len(v) for v in picked.values()) == 450
    sizes = {s["name"]: s["samples"] for s in manifest["shards"]}
    assert all(np.all(np.diff(v) > 0) and v.min() >= 0 and v.max() < sizes[name] for name, v in picked.items())
    share = {name: len(v) / 450 for name, v in picked.items()}
    assert share["s2"] == pytest.approx(3000 / 4510, abs=0.06) and share["s0"] == pytest.approx(1000 / 4510, abs=0.05)
    again = shards.sample_members(manifest, 450, seed=3)
    assert all(np.array_equal(picked[k], again[k]) for k in picked)
