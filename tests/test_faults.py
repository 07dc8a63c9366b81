"""Faults of the driver and of storage, through the real CLI in its own process (and its own private Ray, beside the
test session's: another Ray cluster on the machine must not matter). SIGKILL and then SIGINT of the driver during
training, the same two during labelling, and the S3 endpoint gone in the middle of labelling; each is followed by a
rerun of the same command. After every rerun the output holds every key exactly once, and its parts were written by the model that
`_SUCCESS.json` names (checked by labelling a sample again in this process)."""
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from clustering.data import assignments, shards, storage
from clustering.engine import build_from_spec
from clustering.model.methods import predict_all
from tests.conftest import BUCKET, kill_session
from tests.test_tune import CANARY, files_holding

DIGITS = ["configs/demo.yaml", "shard.samples_per_shard=75", "train.cpus_per_worker=1", "train.joint_epochs=20",
          "train.checkpoint_every=1", "train.name=k", "label.decoders=1", "--num-cpus", "2", "--no-progress"]


def start(*args: str, env: dict | None = None, log=None) -> subprocess.Popen:
    """`dicl ARGS` in a new session, which its private Ray's processes join."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], start_new_session=True, env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(__file__)))


def kill_driver_session(proc: subprocess.Popen) -> None:
    """SIGKILL of the driver and of every process of its session: its private Ray's actors (Ray Train's controller
    and workers) run in process groups of their own, and a killpg of the driver's group left them training, and
    writing checkpoints, for seconds after the driver died."""
    kill_session(proc.pid)
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_driver_session(proc)  # whatever of its Ray is left


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the moment to inject the fault"
        time.sleep(every)


# Waits on S3 poll it ten times a second: a tight loop would take a core from the run it waits on.
ON_S3 = 0.1
# A worker uploads checkpoint K after its report K-1 was queued; Ray Train's queue holds one report, so report K-2
# had been taken, and the controller records a report before it takes the next: once checkpoint K is uploaded,
# epoch K-3 is in Ray Train's record, which a rerun resumes from. (Uploads are quick on the local server: the epochs
# just uploaded are often not yet recorded when the driver dies.)
RECORDED_BEHIND = 3


def check_output(output: str, shards_uri: str, sample: int = 64) -> dict:
    """Every key once, every part by the model _SUCCESS.json names, and that model gives these clusters again."""
    from clustering.checkpoints import load as load_checkpoint

    success = json.loads(storage.read_bytes(storage.join(output, assignments.SUCCESS)))
    manifest = shards.read_manifest(shards_uri)
    table = assignments.read(output, writer={"checkpoint": success["checkpoint"],
                                             "content_hash": manifest["content_hash"]})
    assert len(table) == manifest["num_samples"] == success["rows"] and table["key"].is_unique
    state = load_checkpoint(success["checkpoint"])
    _, model = build_from_spec(state["spec"])
    model.load_state_dict(state["model"])
    mode, side = shards.image_spec(manifest, state["spec"]["side"], state["spec"]["channels"])
    data = shards.load_shard(shards.shard_uris(shards_uri, manifest)[-1], mode, side)
    x = torch.from_numpy(data.images[:sample]).permute(0, 3, 1, 2).contiguous()
    again = predict_all(model.eval(), x)[0].argmax(1).numpy()
    written = table.set_index("key").loc[data.keys[:sample], "cluster"].to_numpy()
    assert np.array_equal(again, written)
    return success


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of the S3 server: stop() drops every connection, as an endpoint that
    dies would, while the server behind keeps its data."""

    def __init__(self, target_port: int, port: int = 0):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = [self.server]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        peers: dict = {}
        while not self.stopped.is_set():
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                if sock is self.server:
                    client, _ = self.server.accept()
                    upstream = socket.create_connection(self.target)
                    peers[client], peers[upstream] = upstream, client
                    self.sockets += [client, upstream]
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                if sock.fileno() < 0:
                    continue  # closed earlier in this same round, with its peer
                try:
                    data = sock.recv(65536)
                    if data:
                        peers[sock].sendall(data)
                        continue
                except OSError:
                    pass
                for s in (sock, peers.pop(sock)):  # one side is done: close the pair
                    if s.fileno() >= 0:
                        sel.unregister(s)
                        s.close()
                    peers.pop(s, None)
        sel.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        for s in self.sockets:
            s.close()


def test_driver_killed_and_interrupted_in_training_and_labelling_and_cut_off_from_s3_then_reruns_finish(ray_local, s3, tmp_path):
    """On S3 through a proxy: train is SIGKILLed (the driver and its private Ray, started beside the test session's),
    rerun and interrupted (Ctrl-C), then rerun to the end; label likewise, then loses the endpoint mid-write, and is
    rerun through a new one. Runs after the first of each join the test session's Ray (RAY_ADDRESS), as under
    `ray job submit`."""
    from clustering.config import PipelineConfig, load_config
    from jobs.shard import run_shard
    from clustering.checkpoints import load as load_checkpoint

    work = f"s3://{BUCKET}/fault"
    run_shard(load_config(PipelineConfig, "configs/demo.yaml", [f"work_dir={work}", *DIGITS[1:2]]).shard, progress=False)
    server_port = int(s3.rsplit(":", 1)[1])
    proxy = TcpProxy(server_port)
    private = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_MAX_ATTEMPTS": "2",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_SESSION_TOKEN": CANARY}  # a credential to look for
    private.pop("RAY_ADDRESS", None)
    joined = {**private, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    run_dir, output = f"{work}/runs/k", f"{work}/assignments"
    train = ["train", *DIGITS, f"work_dir={work}"]
    label = ["label", *DIGITS, f"work_dir={work}", f"label.checkpoint={run_dir}"]

    def log(name):
        return open(tmp_path / f"{name}.log", "wb")

    def text(name):
        return (tmp_path / f"{name}.log").read_text()

    def checkpoints():
        return {d for d in storage.list_dirs(run_dir) if "checkpoint_" in d}

    def newest_epoch():  # checkpoints are named by epoch (jobs/train.py)
        return max((int(d.rsplit("_", 1)[1]) for d in checkpoints()), default=-1)

    def parts():
        return len(storage.list_files(output, ".parquet"))

    def started_labelling(proc, name) -> int:
        """Once the rerun has said what it found done (a late part of the run before it is counted then), the
        number of parts."""
        wait_for(lambda: "doing the rest" in text(name), proc)
        return parts()

    def interrupt(proc, name):  # Ctrl-C, to the driver
        os.kill(proc.pid, signal.SIGINT)
        assert finish(proc, 120) == 130, text(name)
        assert "re-run the same command to resume" in text(name)
    try:
        with log("train1") as f:
            proc = start(*train, env=private, log=f)
            wait_for(lambda: newest_epoch() >= 2 + RECORDED_BEHIND, proc, every=ON_S3)  # epoch 2 recorded
            kill_driver_session(proc)  # SIGKILL of the driver and of its Ray
        with log("train2") as f:
            proc = start(*train, env=joined, log=f)
            # Counted from the epoch it resumed from, as it says (the killed run's last upload may land late).
            wait_for(lambda: "resumed from epoch" in text("train2"), proc)
            resumed = int(re.search(r"resumed from epoch (\d+)", text("train2")).group(1))
            # One epoch more in Ray Train's record (the later ones, uploaded but not yet recorded when Ctrl-C lands,
            # the rerun writes again, under the same names).
            wait_for(lambda: newest_epoch() >= resumed + 1 + RECORDED_BEHIND, proc, every=ON_S3)
            interrupt(proc, "train2")
        with log("train3") as f:
            assert finish(start(*train, env=joined, log=f)) == 0, text("train3")
        final = max(checkpoints())
        history = load_checkpoint(final)["history"]
        # Three processes trained, each resuming where the last left off: no epoch lost or repeated.
        assert [m["epoch"] for m in history] == list(range(20)), [m["epoch"] for m in history]
        resumes = sorted({m["resumed_from"] for m in history})
        assert len(resumes) == 3 and resumes[0] == -1 and resumes[1] >= 2, resumes

        with log("label1") as f:
            proc = start(*label, env=private, log=f)
            wait_for(lambda: parts() >= 1, proc, every=ON_S3)
            kill_driver_session(proc)  # SIGKILL of the driver and of its Ray
        assert not storage.exists(f"{output}/{assignments.SUCCESS}")
        with log("label2") as f:
            proc = start(*label, env=joined, log=f)
            done = started_labelling(proc, "label2")
            wait_for(lambda: parts() > done, proc, every=ON_S3)
            interrupt(proc, "label2")
        assert not storage.exists(f"{output}/{assignments.SUCCESS}")

        with log("label3") as f:
            proc = start(*label, env=joined, log=f)
            # The driver's endpoint is gone once the run has started on the rest. (This run joins the session's
            # Ray, whose workers reach S3 directly and write the parts: the driver fails where it next needs S3.)
            started_labelling(proc, "label3")
            proxy.stop()
            assert finish(proc, 240) == 1, text("label3")  # the network failed, not the input
        assert "error: EndpointConnectionError" in text("label3")
        assert not storage.exists(f"{output}/{assignments.SUCCESS}")

        proxy = TcpProxy(server_port)  # the rerun, through a new endpoint to the same data
        joined["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        with log("label4") as f:
            assert finish(start(*label, env=joined, log=f)) == 0, text("label4")
        assert "shards already labelled" in text("label4")
    finally:
        proxy.stop()
    assert check_output(output, f"{work}/shards")["checkpoint"] == final

    # The planted credential is in no output, checkpoint, log of these runs, or log of the Ray they joined.
    fs, root = storage.filesystem(work)
    assert not [p for p in fs.find(root) if CANARY.encode() in fs.cat_file(p)]
    session = ray_local._private.worker._global_node.get_session_dir_path()
    assert not files_holding(str(tmp_path), CANARY) and not files_holding(session, CANARY)


@pytest.mark.parametrize("where", ["source", "output"])
def test_missing_credentials_and_a_missing_bucket_are_input_errors(s3, tmp_path, where, image_folder, capsys):
    from jobs.cli import main

    for p in sorted(image_folder.rglob("*.png")):
        storage.write_bytes(f"s3://{BUCKET}/creds/{p.name}", p.read_bytes())
    source, output = (f"s3://{BUCKET}/creds", str(tmp_path / "out")) if where == "source" else \
        (str(image_folder), f"s3://{BUCKET}/creds-out")
    saved = {k: os.environ.pop(k, None) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    try:
        code = main(["shard", f"shard.source={source}", f"shard.output={output}", "--no-progress"])
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        os.environ.pop("AWS_SHARED_CREDENTIALS_FILE")
    err = capsys.readouterr().err
    assert code == 2 and "credentials" in err.lower(), err
    code = main(["shard", f"shard.source={image_folder}", "shard.output=s3://no-such-bucket-dicl/x", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-bucket-dicl" in err, err


def test_missing_credentials_name_the_location_in_train_label_and_predict(s3, ray_local, tmp_path, capsys):
    from clustering import DeepClusterer
    from clustering.data.sources import digits_source
    from jobs.cli import main

    work = f"s3://{BUCKET}/creds-jobs"
    assert main(["shard", "configs/demo.yaml", f"work_dir={work}", "--no-progress"]) == 0
    ckpt = DeepClusterer("kmeans", k=3).fit(digits_source().images[:60]).save(str(tmp_path / "ckpt"))
    saved = {k: os.environ.pop(k, None) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    try:
        runs = [(["train", "configs/demo.yaml", f"work_dir={work}"], f"{work}/shards"),
                (["label", "configs/demo.yaml", f"work_dir={work}", f"label.checkpoint={work}/runs/x"], f"{work}/runs/x"),
                (["predict", ckpt, f"{work}/shards", f"predict.output={tmp_path}/p"], f"{work}/shards")]
        for args, where in runs:
            code = main([*args, "--no-progress"])
            err = capsys.readouterr().err
            assert code == 2 and where in err and "credentials" in err.lower() and "Traceback" not in err, err
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        os.environ.pop("AWS_SHARED_CREDENTIALS_FILE")


def test_a_schedulers_sigterm_during_train_and_during_label_ends_as_an_interrupt_and_the_rerun_finishes(ray_local, tmp_path):
    """SIGTERM, as a scheduler, `timeout` or `ray job stop` sends it, to `dicl pipeline` (its own private Ray) while it
    trains, then to the rerun (joined to the session's Ray) while it labels: each ends with 143 and one line naming
    the train.name the run chose, with which the third run finishes, every key once."""
    args = ["pipeline", *[a for a in DIGITS if not a.startswith("train.name")], f"work_dir={tmp_path}/w"]
    private = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    joined = {**private, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    output = f"{tmp_path}/w/assignments"
    assert joined["RAY_ADDRESS"].startswith("127.0.0.1:"), joined["RAY_ADDRESS"]  # the session's Ray, on loopback

    def text(name):
        return (tmp_path / f"{name}.log").read_text()

    def terminated(name, env, ready, extra=()) -> str:  # the line that says how to resume
        with open(tmp_path / f"{name}.log", "wb") as f:
            proc = start(*args, *extra, env=env, log=f)
            wait_for(ready, proc)
            os.kill(proc.pid, signal.SIGTERM)
            assert finish(proc, 120) == 143, text(name)
        said = text(name)
        assert "PC: @" not in said and "Traceback" not in said, said  # no native stack dump, no traceback
        return next(line for line in said.splitlines() if line.startswith("terminated (SIGTERM): "))

    first = terminated("first", private, lambda: "epoch 3/20" in text("first"))
    name = re.fullmatch(r"terminated \(SIGTERM\): re-run the same command with (train\.name=nmm-\S+) to resume .*",
                        first).group(1)  # the name the run chose: the same command alone would start another run
    second = terminated("second", joined, lambda: len(storage.list_files(output, ".parquet")) >= 1, [name])
    assert second.startswith("terminated (SIGTERM): re-run the same command to resume"), second
    with open(tmp_path / "third.log", "wb") as f:
        assert finish(start(*args, name, env=joined, log=f)) == 0, text("third")
    success = check_output(output, f"{tmp_path}/w/shards")
    from clustering.checkpoints import load as load_checkpoint

    history = load_checkpoint(success["checkpoint"])["history"]
    assert [m["epoch"] for m in history] == list(range(20))  # resumed, not started over
