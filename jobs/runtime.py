"""What every job needs from Ray: a connection, a device choice, and storage Ray Train can write to."""
from __future__ import annotations

import os

import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from clustering import storage


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start Ray in this process."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train's controller polls; without it, it warns in a loop.
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=True)


def want_gpu(setting: str) -> bool:
    """'auto' uses GPUs when the cluster has any."""
    if setting == "yes":
        return True
    if setting == "no":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def train_storage(uri: str) -> tuple[str, PyFileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train: local paths as absolute paths, remote URIs through
    the same fsspec filesystem the rest of the project uses (so endpoint settings apply alike)."""
    if not storage.is_remote(uri):
        return os.path.abspath(uri.removeprefix("file://")), None
    fs, path = storage.filesystem(uri)
    return path, PyFileSystem(FSSpecHandler(fs))


def remote_uri(base_uri: str, path: str) -> str:
    """A path Ray reports inside a storage filesystem, as a URI of the same scheme as base_uri."""
    if storage.is_remote(base_uri):
        return base_uri.split("://", 1)[0] + "://" + path.lstrip("/")
    return path
