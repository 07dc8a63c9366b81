import gzip

import numpy as np
import pytest

from clustering.data.sources import BadImage, SourceError, open_source


def test_folder_labels_from_class_folders(image_folder):
    src = open_source(str(image_folder))
    items = src.plan()
    assert src.classes == ["cats", "dogs"]
    assert len(items) == 6 and len({i.key for i in items}) == 6
    assert all("." not in i.key for i in items)  # WebDataset splits key and extension at the first dot
    assert sorted({i.label for i in items}) == [0, 1]
    d = src.load(items[0])
    assert (d.width, d.height, d.mode) == (12, 12, "RGB")


def test_unreadable_image_is_a_bad_image(image_folder):
    (image_folder / "cats" / "broken.jpg").write_bytes(b"not an image at all")
    src = open_source(str(image_folder))
    broken = next(i for i in src.plan() if i.key.endswith("broken"))
    with pytest.raises(BadImage, match="broken.jpg"):
        src.load(broken)


def test_wrong_path_and_empty_folder(tmp_path):
    with pytest.raises(SourceError, match="does-not-exist.*does not exist"):
        open_source(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(SourceError, match="holds no image files"):
        open_source(str(tmp_path / "empty"))


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_idx_folder(tmp_path):
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([7, 1, 3])))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(imgs[:2]))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([0, 9]))))
    src = open_source(str(tmp_path))
    items = src.plan()
    assert len(items) == 5
    assert [i.label for i in items] == [0, 9, 7, 1, 3]  # t10k sorts before train
    assert items[0].key.endswith("t10k/000000")


def test_npz_and_digits(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.zeros((4, 8, 8), np.float32), y=np.arange(4))
    src = open_source(str(tmp_path / "set.npz"))
    assert len(src.plan()) == 4 and src.plan()[3].label == 3
    digits = open_source("sklearn:digits")
    assert len(digits.plan()) == 1797 and digits.images.max() == 255


def test_a_folder_on_s3_lists_and_reads_like_a_local_one(s3, image_folder):
    from clustering.data import storage
    from tests.conftest import BUCKET

    for p in sorted(image_folder.rglob("*")):
        if p.is_file():
            storage.write_bytes(f"s3://{BUCKET}/photos/{p.relative_to(image_folder)}", p.read_bytes())
    local, remote = open_source(str(image_folder)), open_source(f"s3://{BUCKET}/photos")
    assert [(i.key, i.label, i.nbytes) for i in remote.plan()] == [(i.key, i.label, i.nbytes) for i in local.plan()]
    assert remote.classes == local.classes == ["cats", "dogs"]
    assert remote.load(remote.plan()[0]).data == local.load(local.plan()[0]).data
