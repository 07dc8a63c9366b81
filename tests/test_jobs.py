"""shard -> train -> label through a real local Ray on local folders (on S3 via the Jobs API: test_cluster_launch)."""
import json

import pytest

from clustering import lease, metrics, report
from clustering.data import assignments, shards, storage
from clustering.config import PipelineConfig, load_config
from jobs.cli import main

SMALL = ["shard.samples_per_shard=500", "train.joint_epochs=2",
         "train.cpus_per_worker=1", "train.name=t", "train.checkpoint_every=1"]


def run_all(work_dir: str):
    from jobs.label import run_label
    from jobs.shard import run_shard
    from jobs.train import run_train

    cfg = load_config(PipelineConfig, "configs/demo.yaml", SMALL + [f"work_dir={work_dir}"])
    manifest = run_shard(cfg.shard, progress=False)
    trained = run_train(cfg.train)
    info = run_label(cfg.label, checkpoint=trained.checkpoint)
    return cfg, manifest, trained, info


def check_assignments(cfg, k=10):
    table = assignments.read(cfg.label.output)
    assert len(table) == 1797 and table["key"].is_unique
    assert table["cluster"].between(0, k - 1).all()
    assert set(table.columns) >= {"key", "source", "shard", "cluster", "confidence", "probs"}
    assert table["source"].str.fullmatch(r"sklearn:digits#\d+").all()  # the array row each image came from
    assert storage.exists(storage.join(cfg.label.output, assignments.SUCCESS))
    return table


def test_pipeline_on_local_folders(ray_local, tmp_path, capsys):
    cfg, manifest, trained, info = run_all(str(tmp_path))
    assert manifest["num_samples"] == 1797 and len(manifest["shards"]) == 4 and manifest["labelled"] == 1797
    assert trained.checkpoint.rsplit("/", 1)[-1].startswith("checkpoint_")
    check_assignments(cfg)
    success = json.loads(storage.read_bytes(storage.join(cfg.label.output, assignments.SUCCESS)))
    assert success["rows"] == 1797 and sum(success["counts"].values()) == 1797
    summary = report.summarize(cfg.label.output, cfg.label.shards)
    assert summary["scored_rows"] == 1797 and 0 <= summary["acc"] <= 1
    # the label-free figure: the tune job's score, of each image's own cluster (joined by key; a shuffle scores ~0)
    seen = report.sample(cfg.label.output, cfg.label.shards)  # all 1797 here
    images, keys = seen.data.images, seen.data.keys
    clusters = assignments.read(cfg.label.output).set_index("key").loc[keys, "cluster"].to_numpy()
    assert summary["modularity"] == pytest.approx(metrics.knn_modularity(images, clusters)) and summary["modularity"] > 0.3
    # where the run deskews its graph (train.deskew), the report scores on that graph, as the tune job does
    deskewed = report.summarize(cfg.label.output, cfg.label.shards, seen, deskew=True)["modularity"]
    assert deskewed == pytest.approx(metrics.knn_modularity(images, clusters, deskew=True))
    assert deskewed != pytest.approx(summary["modularity"])

    from jobs.label import run_label

    # A checkpoint from the middle of a run lacks the end-of-run fit: labelling it is refused, by name.
    run_dir = trained.checkpoint.rsplit("/", 1)[0]
    earlier = [c for c in storage.list_dirs(run_dir) if c.rsplit("/", 1)[-1].startswith("checkpoint_") and c != trained.checkpoint]
    assert earlier, "checkpoint_every=1 keeps a checkpoint from the middle of the run"
    with pytest.raises(ValueError, match="did not finish"):
        run_label(cfg.label, checkpoint=earlier[0])

    # An interrupted labelling run, re-run with the same arguments, redoes only the missing shard.
    parts = storage.list_files(cfg.label.output, ".parquet")
    kept = {p: storage.read_bytes(p) for p in parts[1:]}
    storage.remove(parts[0])
    storage.remove(storage.join(cfg.label.output, assignments.SUCCESS))
    run_label(cfg.label, checkpoint=trained.checkpoint)
    assert all(storage.read_bytes(p) == b for p, b in kept.items())
    check_assignments(cfg)
    assert assignments.part_writer(parts[0])["checkpoint"] == trained.checkpoint  # each part names its model

    # Sharding again gives the same bytes, so labelling again finds every part done and keeps it.
    from jobs.shard import run_shard

    assert run_shard(cfg.shard, progress=False)["content_hash"] == manifest["content_hash"]
    before = {p: storage.read_bytes(p) for p in storage.list_files(cfg.label.output, ".parquet")}
    assert run_label(cfg.label, checkpoint=trained.checkpoint)["images_per_second"] is None  # nothing left to do
    assert {p: storage.read_bytes(p) for p in storage.list_files(cfg.label.output, ".parquet")} == before

    # While another run holds the output, a label job into it is refused, naming that run.
    with lease.hold(cfg.label.output, "a concurrent dicl label"):
        with pytest.raises(lease.Busy, match="in use by another run \\(a concurrent dicl label"):
            run_label(cfg.label, checkpoint=trained.checkpoint)
    capsys.readouterr()
    code, err = cli(capsys, "label", f"label.shards={cfg.label.shards}", f"label.output={tmp_path}/gpu",
                    f"label.checkpoint={trained.checkpoint}", "label.use_gpu=yes")  # no GPU here: refused at once
    assert code == 2 and "asks for 1 x (1 GPU)" in err, err

    # label.checkpoint empty: the latest finished run under work_dir/runs labels.
    code = main(["label", f"work_dir={tmp_path}", f"label.output={tmp_path}/latest"])
    out = capsys.readouterr().out
    assert code == 0 and "labelling with the latest finished run's checkpoint" in out
    assert "labelled 1,797 images into 10 clusters" in out and f"{tmp_path}/latest/part-*.parquet" in out  # a summary
    assert assignments.part_writer(f"{tmp_path}/latest/part-000000.parquet")["checkpoint"] == trained.checkpoint

    # A shard rewritten after its manifest (an interrupted or concurrent shard job) is refused where it is read.
    first = shards.shard_uris(cfg.label.shards, manifest)[0]
    shards.write_shard(shards.read_shard(first)[:3], first)
    code, err = cli(capsys, "label", f"label.shards={cfg.label.shards}", f"label.output={tmp_path}/stale",
                    f"label.checkpoint={trained.checkpoint}")
    assert code == 2 and "shard-000000.tar is not the shard manifest.json describes" in err, err
    assert not storage.exists(f"{tmp_path}/stale/{assignments.SUCCESS}")

    # A manifest whose count disagrees with the finished parts: no _SUCCESS.json, and what to do.
    shards.write_manifest(cfg.label.shards, {**manifest, "num_samples": manifest["num_samples"] + 5})
    storage.remove(storage.join(cfg.label.output, assignments.SUCCESS))
    code, err = cli(capsys, "label", f"label.shards={cfg.label.shards}", f"label.output={cfg.label.output}",
                    f"label.checkpoint={trained.checkpoint}")
    assert code == 2 and "counts 1,802" in err and "re-run dicl shard, then dicl label" in err, err
    assert not storage.exists(storage.join(cfg.label.output, assignments.SUCCESS))

    # A manifest that lost a shard's entry while the tar stays: refused, naming the tar (else its images go unlabelled).
    edited = {**manifest, "shards": manifest["shards"][:-1]}
    shards.write_manifest(cfg.label.shards, edited)
    code, err = cli(capsys, "label", f"label.shards={cfg.label.shards}", f"label.output={tmp_path}/edited",
                    f"label.checkpoint={trained.checkpoint}")
    assert code == 2 and "shard-000003.tar" in err and "not in its manifest.json" in err, err
    # A manifest cut short: an error naming the file.
    mf = storage.join(cfg.label.shards, shards.MANIFEST)
    storage.write_bytes(mf, storage.read_bytes(mf)[:60])
    code, err = cli(capsys, "label", f"label.shards={cfg.label.shards}", f"label.output={tmp_path}/edited",
                    f"label.checkpoint={trained.checkpoint}")
    assert code == 2 and f"{mf} is not a whole manifest" in err, err


def cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_cli_errors_name_the_input(ray_local, tmp_path, capsys):
    code, err = cli(capsys, "shard", f"shard.source={tmp_path}/missing", f"work_dir={tmp_path}")
    assert code == 2 and f"{tmp_path}/missing" in err and "does not exist" in err

    (tmp_path / "empty").mkdir()
    code, err = cli(capsys, "shard", f"shard.source={tmp_path}/empty", f"work_dir={tmp_path}")
    assert code == 2 and "holds no image files" in err

    code, err = cli(capsys, "pipeline", "configs/demo.yaml", "train.epochs=3")
    assert code == 2 and "train.epochs: unknown key" in err

    code, err = cli(capsys, "train", f"work_dir={tmp_path}/nothing")
    assert code == 2 and "manifest.json is missing" in err

    # refused on the driver, before any worker trains (the defaults: nmm, 50 epochs)
    cli(capsys, "shard", f"work_dir={tmp_path}/demo")
    code, err = cli(capsys, "train", f"work_dir={tmp_path}/demo", "train.restarts=2", "train.restart_epochs=50")
    assert code == 2 and "train.restart_epochs=50 must be fewer than the run's 50 epochs" in err
    code, err = cli(capsys, "train", f"work_dir={tmp_path}/demo", "train.k=5000")
    assert code == 2 and "train.k=5000 is more than the 1,797 images" in err
    code, err = cli(capsys, "train", f"work_dir={tmp_path}/demo", "train.cpus_per_worker=8")
    assert code == 2 and "asks for 1 x (8 CPU)" in err and "can place 0" in err  # at once, not a wait
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"not a checkpoint")
    code, err = cli(capsys, "label", f"work_dir={tmp_path}/demo", f"label.checkpoint={tmp_path}/ckpt")
    assert code == 2 and "is not a checkpoint written by dicl" in err
    code, err = cli(capsys, "shard", "work_dir=s3://")
    assert code == 2 and "names no bucket" in err

    # A failure inside a worker (here a loss gone to infinity) ends as one line naming the cause; exit 1, and the
    # traceback in the log file it names.
    code, err = cli(capsys, "train", f"work_dir={tmp_path}/demo", "train.lr=1e30", "train.max_failures=0",
                    "train.method=dcec", "train.method.pretrain_epochs=1", "train.joint_epochs=2", "train.name=nan")
    lines = err.strip().splitlines()
    assert code == 1 and lines[0].startswith("error: NonFiniteLoss:") and len(lines) == 2, err
    log = lines[1].split("full traceback in ", 1)[1].split(";")[0]
    assert "Traceback" in open(log).read()


def test_unreadable_images_are_counted_not_fatal(ray_local, image_folder, tmp_path, capsys):
    import os

    (image_folder / "cats" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    os.mkfifo(image_folder / "dogs" / "pipe.png")  # a read of it would wait forever for a writer
    out = tmp_path / "shards"
    code = main(["shard", f"shard.source={image_folder}", f"shard.output={out}", "--no-progress"])
    assert code == 0
    manifest = shards.read_manifest(str(out))
    assert manifest["num_samples"] == 6 and manifest["skipped"]["count"] == 2
    examples = " ".join(manifest["skipped"]["examples"])
    assert "corrupt.jpg" in examples and "pipe.png: not a regular file" in examples
    assert "skipped 2 unreadable" in capsys.readouterr().out

    # A shard job that fails part-way into a folder of shards leaves no manifest that could describe a mix of old
    # and new shards: readers then say the shards are missing.
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"nope")
    code, err = cli(capsys, "shard", f"shard.source={only_bad}", f"shard.output={out}")
    assert code == 2 and "no readable images" in err and "x.png" in err
    assert not (out / shards.MANIFEST).exists()
    code, err = cli(capsys, "train", f"train.shards={out}", f"train.storage_path={tmp_path}/runs")
    assert code == 2 and "manifest.json is missing" in err


def test_use_gpu_auto_counts_the_gpu_nodes_an_autoscaler_can_add(ray_local):
    """GPU workers at min_workers 0 (as in ray_cluster.yaml) give no GPU at job start; `auto` still asks for one when
    the autoscaler's record of its node types, which it keeps in Ray's GCS, names a GPU type."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from jobs.runtime import want_gpu

    where = dict(key=ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
    assert not want_gpu("auto")
    gpu_type = autoscaler_pb2.NodeGroupConfig(name="gpu_worker", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4)
    internal_kv._internal_kv_put(value=autoscaler_pb2.ClusterConfig(node_group_configs=[gpu_type]).SerializeToString(),
                                 **where)
    try:
        assert want_gpu("auto") and not want_gpu("no")
    finally:
        internal_kv._internal_kv_del(**where)
    assert not want_gpu("auto")


def listening_sockets(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on, from Linux's /proc."""
    import os
    import socket

    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # ended meanwhile
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in open(table).read().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def descendants(pid: int) -> set[int]:
    import os

    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_the_private_ray_listens_on_loopback_only(ray_local):
    """The Ray that dicl starts for itself (as the tests' own, through the same start_private) accepts no connection
    from another machine: every process of it listens on 127.0.0.1."""
    import os

    @ray_local.remote
    def node_ip() -> str:
        return ray_local.util.get_node_ip_address()

    assert ray_local.get(node_ip.remote()) == "127.0.0.1"
    sockets = listening_sockets(descendants(os.getpid()))
    assert len(sockets) >= 3, sockets  # the GCS, the raylet, the object manager at least
    assert {address for address, _ in sockets} <= {"127.0.0.1", "::ffff:127.0.0.1"}, sockets


def test_an_actor_pool_that_would_leave_no_cpu_for_decoding_is_refused(ray_local, monkeypatch):
    """On a private Ray of 2 CPUs, one labelling actor of 2 CPUs would wait forever for the decoding tasks that feed
    it (it did: `dicl label label.cpus_per_actor=2 --num-cpus 2` hung); it is refused, naming the keys to lower."""
    from jobs.runtime import ResourceError, alive_node_resources, check_pool

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    total = sum(node.get("CPU", 0) for node in alive_node_resources())
    assert total >= 2
    check_pool("label", 1, int(total) - 1, gpu=False)
    with pytest.raises(ResourceError, match="lower label.cpus_per_actor or label.actors"):
        check_pool("label", 1, int(total), gpu=False)
