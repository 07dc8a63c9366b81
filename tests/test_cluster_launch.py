"""The cluster launch, rehearsed on this machine: ray_cluster.yaml as Ray's launcher reads it, and a head and a
worker node, each its own `ray start` on 127.0.0.1 with token auth, that run `dicl pipeline` submitted through the
Jobs API against the local S3 server: shard, tune, train on both nodes, label, report, all on S3."""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from clustering.data import assignments, storage
from infra.local_s3 import free_port
from jobs.runtime import GPU_NODE_TYPES_MARKER

from tests.conftest import BUCKET, kill_session, session_pids

BIN = Path(sys.executable).parent  # ray and dicl of this environment
REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_as_written_and_has_no_placeholders():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    validate_config(copy.deepcopy(config))  # as written, not only after the launcher fills in its defaults
    validate_config(prepare_config(copy.deepcopy(config)))
    assert not re.search(r"your-org|123456789012|ami-0a1b|:latest|REPLACE|TODO", text)
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-gpu", config["docker"]["image"])  # pinned by tag
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in config, f"{key}: explicit, or Ray injects its defaults"
    assert any("pip install" in c and "~/dicl" in c for c in config["setup_commands"])
    types = config["available_node_types"]
    assert all(t["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:")) for t in types.values())
    assert types[config["head_node_type"]]["resources"][GPU_NODE_TYPES_MARKER] == 1
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())  # GPU types exist
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[key]), f"{key}: token auth on every node"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def ray_start(env: dict, temp_dir: str, log: Path, *args: str) -> subprocess.Popen:
    """One Ray node in its own process group, every port chosen free (two nodes share 127.0.0.1), and its own
    temp_dir: nodes that share one also share the session folder where each node's runtime-env agent unpacks
    and garbage-collects a job's working_dir, and one node then deletes the folder that a job runs in on the
    other. That was the rehearsal's "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (torch loading with
    its working directory gone), and "configs/demo.yaml does not exist" when the job got further."""
    ports = {name: free_port() for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port")}
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--object-store-memory=300000000", *args,
           *(f"--{name}={port}" for name, port in ports.items())]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """The nodes and every process of their sessions, at once with SIGKILL: `ray start --block` answers SIGTERM
    with a graceful shutdown of its processes one by one, which takes over 10 s here, and nothing of the nodes needs
    to outlive the test. Bounded: until no process of those sessions is left."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for proc in procs:
            kill_session(proc.pid)
            proc.poll()  # reap the leader
        if not any(session_pids(proc.pid) for proc in procs):
            return
        time.sleep(0.1)


def ray_cli(env: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_nodes(s3, tmp_path):
    """A head (1 CPU, the GPU-types marker of ray_cluster.yaml's head) and a worker (1 CPU), both with token auth
    and the S3 endpoint in their environment, as a cluster's nodes have their credentials. Yields (the dashboard's
    address, env, the GCS address)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               DICL_RESOURCE_WAIT_S="60")
    temp_dirs = [tempfile.mkdtemp(prefix="dicl-ray-", dir="/tmp") for _ in range(2)]  # socket paths stay short
    gcs, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    log = tmp_path / "ray-start.log"
    nodes = [ray_start(env, temp_dirs[0], log, "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                       "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                       "--num-cpus=1", f"--resources={json.dumps({GPU_NODE_TYPES_MARKER: 1})}")]
    try:
        nodes.append(ray_start(env, temp_dirs[1], log, f"--address=127.0.0.1:{gcs}", "--num-cpus=1"))
        for _ in range(60):  # bounded: both nodes alive in the state API, through the dashboard, with the token
            listed = ray_cli(env, "list", "nodes", f"--address={address}", "--format=json", timeout=30)
            alive = json.loads(listed.stdout) if listed.stdout.startswith("[") else []  # else "No resource ..."
            if sum(n["state"] == "ALIVE" for n in alive) == 2:
                break
            assert all(n.poll() is None for n in nodes), log.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"two nodes did not come up: {listed.stderr[-2000:]}\n{log.read_text()[-3000:]}")
        yield address, env, f"127.0.0.1:{gcs}"
    finally:
        stop(nodes)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_submitted_through_the_jobs_api_to_a_head_and_a_worker_node(two_nodes):
    address, env, gcs = two_nodes
    work_dir = f"s3://{BUCKET}/rehearsal-{secrets.token_hex(3)}"
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    without_token = ray_cli(no_token, "job", "list", f"--address={address}", timeout=60)
    assert without_token.returncode != 0  # the Jobs API refuses a client without the token
    # So does the cluster, to a driver without it: one line naming the cause and the fix, exit 2.
    joined = subprocess.run(["dicl", "train", "configs/demo.yaml", f"work_dir={work_dir}", "--address", gcs],
                            env=no_token, cwd=REPO, capture_output=True, text=True, timeout=120)
    said = joined.stderr.splitlines()
    assert joined.returncode == 2 and said[-2].startswith(f"error: the Ray cluster at {gcs} refused this process: "
                                                          "it requires token auth"), joined.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in said[-2] and "RUNBOOK" in said[-2] and "Traceback" not in joined.stderr
    # The marker on the head (as in ray_cluster.yaml) makes use_gpu=auto count GPU nodes an autoscaler could add;
    # this machine has none to add, so the pipeline itself runs with use_gpu=no.
    probe = "python -c 'import ray; from jobs.runtime import want_gpu; ray.init(); print(\"auto wants a GPU:\", want_gpu(\"auto\"))'"
    pipeline = " ".join(["dicl", "pipeline", "configs/demo.yaml", f"work_dir={work_dir}", "shard.samples_per_shard=500",
                         "train.num_workers=2", "train.cpus_per_worker=1",
                         "train.joint_epochs=2", "train.checkpoint_every=2", "train.use_gpu=no", "label.use_gpu=no",
                         "'tune.space={k: [6, 8]}'"])
    submitted = ray_cli(env, "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
                        "bash", "-c", f"{probe} && {pipeline}", timeout=480)
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "auto wants a GPU: True" in out
    # 2 training workers of 1 CPU on nodes of 1 CPU each: the run spanned both nodes.
    assert "[2/5] tune k" in out and "on 2 worker(s)" in out and "[5/5] report" in out and "Summary" in out
    assert "trial 2/2 k=" in out and "Trial status" not in out  # one line per trial, not Ray Tune's tables
    # Tune's trial state and the run's checkpoints went to the same object store; the winner trained and labelled.
    best = yaml.safe_load(storage.read_bytes(f"{work_dir}/tune/best.yaml"))["train"]
    assert any(f"{work_dir}/runs/" in line and "/checkpoint_" in line for line in out.splitlines())
    assert len(storage.list_files(f"{work_dir}/shards", ".tar")) == 4
    table = assignments.read(f"{work_dir}/assignments")
    assert len(table) == 1797 and table["key"].is_unique and table["shard"].nunique() == 4
    assert table["cluster"].max() < best["k"] and len(table["probs"].iloc[0]) == best["k"]
    success = json.loads(storage.read_bytes(f"{work_dir}/assignments/{assignments.SUCCESS}"))
    assert success["rows"] == success["expected_rows"] == 1797
    assert storage.exists(f"{work_dir}/report/index.html")
