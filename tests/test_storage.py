import pytest

from clustering.data import storage
from tests.conftest import BUCKET


def test_local_write_is_atomic_and_listable(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert [p.rsplit("/", 1)[-1] for p in storage.list_files(str(tmp_path / "a"))] == ["b.bin"]  # no temp files left


def test_file_uri(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/x.txt", b"hi")
    assert (tmp_path / "x.txt").read_bytes() == b"hi"


def test_s3_round_trip(s3):
    uri = f"s3://{BUCKET}/storage/one.bin"
    storage.write_bytes(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"
    assert uri in storage.list_files(f"s3://{BUCKET}/storage")


def test_wrong_bucket_is_a_clear_error(s3):
    with pytest.raises(storage.StorageError, match="cannot write to s3://no-such-bucket-here/x.*credentials"):
        storage.check_writable("s3://no-such-bucket-here/x")


def test_missing_object_names_it(tmp_path):
    with pytest.raises(storage.StorageError, match="nothing-here"):
        storage.read_bytes(str(tmp_path / "nothing-here"))


def test_one_s3_filesystem_per_environment_and_listings_never_stale(s3, monkeypatch):
    folder = f"s3://{BUCKET}/storage-listing"
    storage.write_bytes(f"{folder}/a/x.bin", b"1")
    assert storage.list_dirs(folder) == [f"{folder}/a"]
    fs = storage.s3_filesystem()
    fs.pipe_file(f"{BUCKET}/storage-listing/b/y.bin", b"2")  # as another process would write it
    assert storage.list_dirs(folder) == [f"{folder}/a", f"{folder}/b"]  # the new folder is seen at once
    assert storage.s3_filesystem() is fs  # made once, not per call
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # another endpoint: another filesystem
    assert storage.s3_filesystem() is not fs


def test_a_path_under_home_resolves_alike_where_it_is_written_and_where_it_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    storage.write_bytes("~/x/f.bin", b"1")  # as the shard job writes (fsspec expands ~)
    assert storage.absolute("~/x") == str(tmp_path / "x")  # as train and label resolve it
    assert (tmp_path / "x" / "f.bin").read_bytes() == b"1" and storage.exists(storage.join(storage.absolute("~/x"), "f.bin"))


def test_a_failed_write_leaves_no_temporary_file_and_a_lease_sweeps_a_killed_writers(tmp_path, monkeypatch):
    import errno
    import os

    from clustering import lease

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", full)
        with pytest.raises(OSError, match=f"No space left on device: {tmp_path}/shard-000000.tar"):
            storage.write_bytes(str(tmp_path / "shard-000000.tar"), b"x" * 1000)
    assert list(tmp_path.iterdir()) == []
    # what a SIGKILLed writer leaves: swept by the next holder of the folder's lease, and nothing else
    for name in ["shard-000001.tar.tmp-1a2b3c4d", "_LOCK.json.tmp-5e6f7a8b", "shard-000002.tar"]:
        (tmp_path / name).write_bytes(b"1")
    with lease.hold(str(tmp_path), "test"):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["_LOCK.json", "shard-000002.tar"]


def test_an_error_of_the_device_names_the_object(tmp_path, monkeypatch):
    import errno

    from fsspec.implementations.local import LocalFileSystem

    (tmp_path / "shard-000003.tar").write_bytes(b"1")

    def remote_io(self, path, *args, **kwargs):
        raise OSError(errno.EREMOTEIO, "Remote I/O error")

    monkeypatch.setattr(LocalFileSystem, "cat_file", remote_io)
    with pytest.raises(OSError, match=f"Remote I/O error: {tmp_path}/shard-000003.tar") as e:
        storage.read_bytes(str(tmp_path / "shard-000003.tar"))
    assert e.value.errno == errno.EREMOTEIO
