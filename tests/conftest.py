"""Shared fixtures: one local S3 server (moto, 127.0.0.1) and one local Ray per test session."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BUCKET = "dicl-test"
# Ray Train's controller, for every run of the suite: no spot-preemption watcher (one actor fewer to start). Its
# poll is the product's (jobs.runtime.ray_train_environment).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every Ray the suite starts (a dozen) would start a Python worker per CPU that no test may use: 0.8 s of CPU each.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes (make test) share the 2 cores with Ray's workers
    import torch

    torch.set_num_threads(1)
SHARED_DATA = Path(os.environ.get("DICL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def log_dir(tmp_path_factory):
    """The CLI's log files (tracebacks) go to a temporary folder, not the checkout's outputs/."""
    os.environ["DICL_LOG_DIR"] = str(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint on loopback; the environment points at it for the whole session (Ray included)."""
    from infra.local_s3 import local_s3

    with local_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_session(s3):
    """Shuts down, at the end of the session, the local Ray that tests share (started after the S3 env is set, so
    its workers inherit it)."""
    import ray

    from jobs.runtime import ray_train_environment

    ray_train_environment()  # as the CLI sets it, before Ray starts
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """A local Ray with 2 CPUs, started once and shared by the modules that use it (a module that needs another
    cluster shuts it down, and the next test here starts it again)."""
    if not ray_session.is_initialized():  # never a cluster someone else started; no dashboard (its processes cost
        # seconds of CPU at each start, and no test reads it: the Jobs API's is test_cluster_launch's own head)
        from jobs.runtime import start_private  # on 127.0.0.1 only, as dicl's own private Ray

        start_private(2, False, {"log_to_driver": False})
    return ray_session


def session_pids(leader: int) -> list[int]:
    """Every live process of the session that `leader` started (start_new_session=True). A Ray started there puts its
    actors in process groups of their own, so killing the leader's group would leave them running."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == leader:  # after the name: state ppid pgrp session
                    pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return pids


def kill_session(leader: int) -> None:
    """SIGKILL to every process of the session that `leader` started."""
    for pid in session_pids(leader):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ram_tmp(tmp_path) -> Path:
    """A scratch folder in memory (/dev/shm) where there is one, else tmp_path: for tests that write tens of thousands
    of files, which a disk takes seconds to tens of seconds to create (extracting CIFAR-10's 60,000 JPEGs on the
    2-core machine: 0.7 s in /dev/shm, 23 s under /tmp; the CIFAR test: 3 s, against 5 to 35 s on disk)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="dicl-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A tiny folder tree: two class folders of real PNG/JPEG files."""
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"img.{i}.{'png' if i % 2 else 'jpg'}")
    return tmp_path


def need_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set DICL_SHARED_DATA to the shared data folder)")
    return path
