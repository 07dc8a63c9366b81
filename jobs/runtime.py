"""What every job needs from Ray: a connection, a device choice, and storage Ray Train can write to."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator

import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from clustering.data import storage

from .progress import QUIET, ray_logs_to_file
from .signals import terminate_as_interrupt


class ResourceError(RuntimeError):
    """A resource request the cluster cannot meet; the message says what was asked and what there is."""


class ClusterError(RuntimeError):
    """A Ray that cannot be joined or started as things are; the message says why and what to do."""


def init_ray(num_cpus: int | None = None, address: str | None = None, quiet_into: str | None = None,
             dashboard: bool = False) -> None:
    """Join the cluster named by `address` or RAY_ADDRESS (as under `ray job submit`), else start a private Ray in
    this process: never some other cluster that happens to run on this machine. The private Ray has Ray's dashboard
    only when asked: its processes cost seconds of CPU at every start, and our jobs print their own progress.
    quiet_into: a log file: Ray's own output stays off the terminal (workers' output in Ray's session logs, the
    driver's Ray loggers into this file, no Ray Data progress bars); our jobs print what matters."""
    if ray.is_initialized():
        return
    ray_train_environment()  # before a private Ray starts: its workers (Tune's trials) inherit it
    if address:
        os.environ["RAY_ADDRESS"] = address  # one signal of a joined cluster, which check_resources reads too
    if quiet_into:
        ray_logs_to_file(quiet_into)
        QUIET["log"] = quiet_into
    kwargs = {"log_to_driver": not quiet_into, "logging_level": logging.WARNING if quiet_into else logging.INFO}
    if os.environ.get("RAY_ADDRESS"):
        join_cluster(kwargs)
    else:
        start_private(num_cpus or os.cpu_count(), dashboard, kwargs)
    terminate_as_interrupt()  # Ray's own SIGTERM handler dumps a native stack and aborts
    if quiet_into:
        from ray.data import DataContext  # Ray Data sets up its loggers when first imported: before they move

        ray_logs_to_file(quiet_into)
        DataContext.get_current().enable_progress_bars = False


def start_private(num_cpus: int, dashboard: bool, kwargs: dict) -> None:
    """A private Ray on this machine alone: every process of it listens on 127.0.0.1 only (Ray's default is every
    interface, for nodes that may join; none may join this one). Its start is tried twice: two Rays starting at once
    on a loaded machine can miss Ray's fixed 30 s wait for the node ("timed out during startup")."""
    for attempt in (1, 2):
        try:
            with loopback_only():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)
            return
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            if attempt == 2:
                raise ClusterError(f"the private Ray did not start, twice ({e}): the machine may be overloaded; "
                                   "try again, or start fewer jobs at once") from None
            print("Ray's start timed out (a loaded machine?): trying once more", flush=True)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a private Ray starts: Ray's own switch to loopback addresses (its macOS/Windows default), in this process
    and in the processes it starts (they keep the environment they started with). Put back after, so that a process
    this one starts later (`ray start` of a cluster's node) is not refused."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[1]


def join_cluster(kwargs: dict) -> None:
    """Join the cluster of RAY_ADDRESS; a refusal for want of its token is named, with the fix. A cluster at a
    loopback address (a private Ray of this machine, which listens there only) is joined on loopback: Ray would
    otherwise swap 127.0.0.1 for this machine's address."""
    address = os.environ["RAY_ADDRESS"]
    try:
        with loopback_only() if address.startswith(("127.0.0.1:", "localhost:")) else contextlib.nullcontext():
            ray.init(**kwargs)
    except Exception as e:
        said = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)  # Ray wraps it twice
        if "InvalidAuthToken" not in said and "AuthenticationError" not in said:
            raise
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        raise ClusterError(f"the Ray cluster at {address} refused this process: it requires token "
                           f"auth, and this shell has RAY_AUTH_MODE={mode} or no token. export RAY_AUTH_MODE=token, "
                           "with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (infra/RUNBOOK.md, "
                           "Token auth)") from None


def ray_train_environment() -> None:
    """What Ray Train reads from the environment of the process that makes a run (it passes it on to the run's
    controller and workers), unless the user set it:
    - its controller's poll, every 0.2 s rather than 2: a worker's report waits until the controller takes the one
      before, one per poll, so at 2 s a run that checkpoints every epoch could not go faster than an epoch per 2 s
      (10 epochs of 0.2 s took 18.1 s, and 2.0 s at 0.2; a poll is one small call per worker);
    - no print patch: our lines come through the Board, and with the patch Ray Train also logs every worker print
      and, where Ray redirected stdout, prints it again."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def alive_node_resources() -> list[dict[str, float]]:
    """Each live node's total resources, e.g. {"CPU": 8, "GPU": 1, "memory": ...}."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_resources(what: str, bundle: dict[str, float], count: int, wait_s: float | None = None) -> None:
    """Fail fast, naming the request, when `count` bundles (e.g. {"CPU": 2, "GPU": 1} per worker) can never be placed
    on the cluster's nodes. A joined cluster may grow (an autoscaler, as in ray_cluster.yaml): there it waits up to
    DICL_RESOURCE_WAIT_S seconds (default 600) for the nodes; a private local Ray cannot grow, so it fails at once."""
    if wait_s is None:
        wait_s = float(os.environ.get("DICL_RESOURCE_WAIT_S", 600)) if os.environ.get("RAY_ADDRESS") else 0.0
    deadline, told = time.monotonic() + wait_s, False
    need = {k: v for k, v in bundle.items() if v > 0}
    while True:
        nodes = alive_node_resources()
        fits = sum(min((int(node.get(k, 0) // v) for k, v in need.items()), default=count) for node in nodes)
        if fits >= count:
            return
        have = ", ".join(f"{k} {sum(n.get(k, 0) for n in nodes):g}" for k in need) or "nothing"
        asked = " + ".join(f"{v:g} {k}" for k, v in need.items())
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:.0f}s for more nodes" if wait_s else ""
            raise ResourceError(
                f"{what} asks for {count} x ({asked}) and the cluster's {len(nodes)} node(s) can place {fits}{waited} "
                f"(they have {have} in all). Ask for less (fewer workers, fewer CPUs each, use_gpu=no), or add nodes.")
        if not told:
            print(f"{what}: waiting up to {wait_s:.0f}s for nodes with {count} x ({asked}); the cluster has {have}",
                  flush=True)
            told = True
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def check_pool(what: str, actors: int, cpus_per_actor: int, gpu: bool) -> None:
    """A Ray Data actor pool (label, features) can be placed: a GPU per actor, or `cpus_per_actor` CPUs each and, on
    a private Ray, which cannot grow, a CPU left for the tasks that feed it (decoding shards): a pool that took every
    CPU would wait for them forever. A joined cluster can add a node."""
    check_resources(f"{what} ({actors} actors)", {"GPU": 1} if gpu else {"CPU": cpus_per_actor}, actors)
    if gpu or os.environ.get("RAY_ADDRESS"):
        return
    total = sum(node.get("CPU", 0) for node in alive_node_resources())
    if actors * cpus_per_actor >= total:
        raise ResourceError(f"{what}: {actors} actor(s) x {cpus_per_actor} CPUs would take all {total:g} CPUs, and the "
                            "tasks that read the shards need one: lower label.cpus_per_actor or label.actors")


@contextlib.contextmanager
def credentials_out_of_runtime_envs() -> Iterator[None]:
    """Ray Tune copies AWS_* credentials from the driver's environment into every trial's runtime_env, and Ray writes
    runtime envs in clear text to its session logs. Trials do not need the copy: their workers inherit the node's
    environment (a private Ray started by this process) or the node's credential chain (an instance profile on a
    cluster, as ray_cluster.yaml sets up). So Tune's copy is switched off while it runs."""
    from ray.tune.execution import class_cache

    saved = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in saved if not name.startswith("AWS_")}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = saved


# A custom resource that ray_cluster.yaml puts on the head node: "this cluster has GPU node types", for autoscalers
# that do not report their node types to Ray (see cluster_may_have_gpus).
GPU_NODE_TYPES_MARKER = "dicl_gpu_node_types"


def cluster_may_have_gpus() -> bool:
    """True when the cluster has a GPU now, or can add GPU nodes: an autoscaling cluster with GPU workers at
    min_workers 0 has none at job start. Two signals of the second: the node types the autoscaler reports to Ray
    (the source Ray Train itself checks requests against), and the marker resource ray_cluster.yaml sets."""
    if any(r.get("GPU", 0) > 0 or r.get(GPU_NODE_TYPES_MARKER) for r in alive_node_resources()):
        return True
    from ray._private.state import state  # no public API for the autoscaler's node types in Ray 2.60

    try:
        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # an older GCS without the record: no signal
        most = {}
    return most.get("GPU", 0) > 0


def want_gpu(setting: str) -> bool:
    """'auto' uses GPUs when the cluster has, or can add, GPU nodes."""
    if setting == "yes":
        return True
    if setting == "no":
        return False
    return cluster_may_have_gpus()


def chunks(items: list, size: int) -> list[list]:
    """Consecutive groups of `size` items (the last may be shorter): the work of one task each."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def train_storage(uri: str) -> tuple[str, PyFileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train: local paths as absolute paths, remote URIs through
    the same fsspec filesystem the rest of the project uses (so endpoint settings apply alike)."""
    if not storage.is_remote(uri):
        return storage.absolute(uri), None
    fs, path = storage.filesystem(uri)
    return path, PyFileSystem(FSSpecHandler(fs))


def remote_uri(base_uri: str, path: str) -> str:
    """A path Ray reports inside a storage filesystem, as a URI of the same scheme as base_uri."""
    if storage.is_remote(base_uri):
        return base_uri.split("://", 1)[0] + "://" + path.lstrip("/")
    return path
