"""The tune job through a real local Ray Tune: one trial per combination, the winner chosen without labels. The whole
pipeline with tune, on S3 through the Jobs API: test_cluster_launch."""
import json
import os
from pathlib import Path

import pytest
import yaml

from clustering import checkpoints
from clustering.data import storage
from clustering.config import ConfigError, PipelineConfig, load_config
from jobs.cli import main

SMALL = ["shard.samples_per_shard=500", "train.joint_epochs=3", "train.cpus_per_worker=1"]


CANARY = "dicl-canary-secret-7f3a9c"


def files_holding(root: str, text: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    if text.encode() in f.read():
                        found.append(os.path.join(folder, name))
            except OSError:
                continue
    return found


def test_tune_trains_every_combination_and_picks_by_the_label_free_score(ray_local, tmp_path, capsys, monkeypatch):
    from jobs.shard import run_shard
    from jobs.tune import format_table, run_tune

    # k is a shared key, consistency_weight a setting of the method (nmm): a space names both alike. The trials of
    # lr = 1e30 fail (NaN loss).
    cfg = load_config(PipelineConfig, "configs/demo.yaml", SMALL + [
        f"work_dir={tmp_path}", "tune.space={k: [2, 6], consistency_weight: [0.5], lr: [1.0e+30, 1.0e-3]}"])
    run_shard(cfg.shard, progress=False)
    # A recognisable credential in the driver's environment (the local S3 server accepts any): Ray Tune would copy it
    # into each trial's runtime env, which Ray logs in clear text. It must appear in no output and no Ray log.
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY)
    summary = run_tune(cfg)
    session = ray_local._private.worker._global_node.get_session_dir_path()
    assert not files_holding(session, CANARY) and not files_holding(str(tmp_path), CANARY)

    trials = summary["trials"]
    finished, failed = trials[:2], trials[2:]  # a trial that fails is listed with its cause, last
    assert sorted(t["values"]["k"] for t in finished) == [2, 6] and all(t["values"]["lr"] == 1e-3 for t in finished)
    assert all(t["clusters_used"] <= t["values"]["k"] and -1 <= t["silhouette"] <= 1 and t["modularity"] <= 1
               and 0 < t["evenness"] <= 1 for t in finished)
    assert all("acc_vs_labels" in t for t in finished)  # the digits carry labels: scored, for the table only
    assert sorted(t["values"]["k"] for t in failed) == [2, 6] and all(t["values"]["lr"] == 1e30 for t in failed)
    assert all("NonFiniteLoss" in t["error"] for t in failed)
    # the default score, modularity_x_evenness, chooses; the failed trials do not stop it
    assert all(t["modularity_x_evenness"] == pytest.approx(t["modularity"] * t["evenness"]) for t in finished)
    assert summary["best"] == max(finished, key=lambda t: t["modularity_x_evenness"])["values"]
    written = json.loads(storage.read_bytes(f"{tmp_path}/tune/trials.json"))
    assert written["metric"] == "modularity_x_evenness" and written["trials"] == trials
    best = summary["best"]
    assert yaml.safe_load(storage.read_bytes(summary["best_yaml"])) == {
        "train": {"k": best["k"], "lr": 0.001, "method": {"name": "nmm", "consistency_weight": 0.5}}}
    assert f"best: train.method.consistency_weight=0.5 train.k={best['k']} train.lr=0.001" in format_table(summary)
    # the terminal: one line as each trial ends, not Ray Tune's tables
    out = capsys.readouterr().out
    assert sum(line.startswith("trial ") for line in out.splitlines()) == 4 and "trial 4/4 " in out
    assert out.count(": failed") == 2 and "Trial status" not in out and "Configuration for experiment" not in out


def test_asha_stops_a_trial_that_trails_and_picks_among_the_finished(ray_local, tmp_path):
    from jobs.shard import run_shard
    from jobs.tune import format_table, run_tune

    # One trial at a time, in grid order: k = 10 trains to the end, then k = 2 trails it at the grace epoch.
    cfg = load_config(PipelineConfig, "configs/demo.yaml", SMALL + [
        f"work_dir={tmp_path}", "train.joint_epochs=6", "tune.space={k: [10, 2]}", "tune.scheduler=asha",
        "tune.grace_epochs=2", "tune.report_every=1", "tune.max_concurrent=1"])
    run_shard(cfg.shard, progress=False)
    summary = run_tune(cfg)

    finished, stopped = summary["trials"]
    assert finished["values"] == {"k": 10} == summary["best"] and "stopped_at_epoch" not in finished
    assert stopped["values"] == {"k": 2} and stopped["stopped_at_epoch"] == 2
    metric = "modularity_x_evenness"  # the default: a stopped trial reports only it
    assert stopped[metric] < finished[metric] and "acc_vs_labels" not in stopped
    assert "1 finished, 1 stopped early, 0 failed" in format_table(summary)


def test_tune_refuses_bad_trials_before_training(ray_local, tmp_path, capsys):
    from jobs.tune import run_tune

    assert main(["shard", "configs/demo.yaml", f"work_dir={tmp_path}", "--no-progress"]) == 0
    cfg = load_config(PipelineConfig, "configs/demo.yaml", [f"work_dir={tmp_path}", "tune.space={k: [10, 1]}"])
    with pytest.raises(ConfigError, match=r"trial \{'k': 1\} is not a valid train config"):
        run_tune(cfg)
    cfg = load_config(PipelineConfig, "configs/demo.yaml", [f"work_dir={tmp_path}", "tune.space={rec_weight: [1, 5]}"])
    with pytest.raises(ConfigError, match="'rec_weight' is not a setting of method nmm"):  # dcec's, not nmm's
        run_tune(cfg)
    with pytest.raises(ConfigError, match="tune.space is empty"):
        run_tune(load_config(PipelineConfig, "configs/demo.yaml", [f"work_dir={tmp_path}"]))
    capsys.readouterr()
    assert main(["tune", "configs/demo.yaml", f"work_dir={tmp_path}/none", "tune.space={k: [8]}"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_optuna_draws_trials_from_distributions_with_asha_on_top(ray_local, tmp_path):
    from jobs.shard import run_shard
    from jobs.tune import run_tune

    cfg = load_config(PipelineConfig, "configs/demo.yaml", SMALL + [
        f"work_dir={tmp_path}", "train.joint_epochs=4", "tune.search=optuna", "tune.num_samples=3",
        "tune.space={k: {randint: [6, 13]}, lr: {loguniform: [3.0e-4, 3.0e-3]}, consistency_weight: [0.5, 1.0]}",
        "tune.scheduler=asha", "tune.grace_epochs=2", "tune.report_every=1", "tune.max_concurrent=1"])
    run_shard(cfg.shard, progress=False)
    summary = run_tune(cfg)

    trials = summary["trials"]
    assert len(trials) == 3 and not [t for t in trials if "error" in t]
    values = [t["values"] for t in trials]
    assert all(6 <= v["k"] < 13 and 3e-4 <= v["lr"] <= 3e-3 and v["consistency_weight"] in (0.5, 1.0) for v in values)
    assert len({v["lr"] for v in values}) == 3  # drawn by the searcher, each trial its own
    assert json.loads(storage.read_bytes(f"{tmp_path}/tune/trials.json"))["trials"] == trials
    best = yaml.safe_load(storage.read_bytes(summary["best_yaml"]))["train"]
    assert best["k"] == summary["best"]["k"] and best["method"]["consistency_weight"] == summary["best"]["consistency_weight"]


def test_an_experiment_killed_after_a_trial_resumes_without_running_it_again(ray_local, tmp_path, capsys):
    """`dicl tune` in its own process, joined to the running Ray as under `ray job submit`, is killed once its first
    trial has finished; the same command with the same tune.name resumes: the finished trial is kept, not trained
    again."""
    import pickle
    import re
    import signal
    import subprocess
    import sys
    import time

    from jobs.tune import run_tune, saved_state_whole

    args = ["configs/demo.yaml", f"work_dir={tmp_path}", *SMALL, "train.joint_epochs=10", "tune.name=again",
            "tune.space={k: [6, 8]}", "tune.max_concurrent=1"]
    assert main(["shard", *args, "--no-progress"]) == 0
    experiment = tmp_path / "runs" / "again"

    def finished_in_state() -> int:  # trials the saved experiment state, whole, records as finished
        if not saved_state_whole(str(experiment)):  # not there yet, or being copied
            return 0
        try:
            for search in experiment.glob("basic-variant-state-*.json"):  # the search's own state, a pickle
                pickle.loads(search.read_bytes())
        except (EOFError, pickle.UnpicklingError):  # being copied
            return 0
        return len(re.findall(r"status\W+TERMINATED", max(experiment.glob("experiment_state-*.json")).read_text()))

    def final_results() -> list[Path]:  # trials' result.json whose last line, whole, is the final report
        found = []
        for path in experiment.glob("*/result.json"):
            try:
                if json.loads(path.read_text().splitlines()[-1]).get("final"):
                    found.append(path)
            except (IndexError, ValueError):  # empty, or its last line being copied
                pass
        return found

    def first_trial_saved() -> bool:
        return finished_in_state() >= 1 and len(final_results()) >= 1

    # Tune saves its experiment state every 10 s at most; here at every step, so that the first trial is recorded as
    # finished while the second (in the same actor, at once) still trains.
    joined = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "tune", *args, "--no-progress"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=joined)
    try:
        # Tune writes its state and each trial's result.json in a staging folder and copies the whole folder to storage,
        # file by file and in place, at every save: the state can say finished before result.json is there, and a kill
        # in the middle of a copy leaves a file cut short. The kill lands where storage holds the first trial whole:
        # the driver is stopped (SIGSTOP), storage checked, and killed, or let go on (SIGCONT) to try again.
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, "the first trial did not finish"
            if first_trial_saved():
                os.killpg(proc.pid, signal.SIGSTOP)
                if first_trial_saved():
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    first = final_results()
    assert len(first) == 1
    kept = first[0].read_text()  # its timings and timestamps: a trial trained again writes others

    capsys.readouterr()
    summary = run_tune(load_config(PipelineConfig, args[0], args[1:]))
    assert "tune: resuming experiment again" in capsys.readouterr().out
    assert sorted(t["values"]["k"] for t in summary["trials"]) == [6, 8]
    assert first[0].read_text() == kept  # it did not run again (Tune may copy its folder again as it was)
    # Nor in a second folder. (The unfinished trial may get two on restore, a Ray Tune quirk: "Creating a new dirname".)
    def trial(path: Path) -> str:  # its folder's name less the time it was made: run_trial_<experiment>_<index>_...
        return re.sub(r"_\d{4}-\d\d-\d\d_.*", "", path.parent.name)
    assert [p for p in experiment.glob("*/result.json") if trial(p) == trial(first[0])] == first


def test_a_saved_state_cut_short_is_told_apart_from_a_whole_one(tmp_path):
    """A run killed while Ray Tune copies its state leaves the file cut short; resuming from it, Tune starts over, and
    the tune job says so rather than "resuming"."""
    from jobs.tune import saved_state_whole

    assert not saved_state_whole(str(tmp_path))  # nothing saved yet
    state = json.dumps({"trial_data": [["{\"status\": \"TERMINATED\"}", "{}"]], "runner_data": {}}).encode()
    (tmp_path / "experiment_state-2026-12-05_01-00-00.json").write_bytes(b"{not json")  # an older session's: not read
    (tmp_path / "experiment_state-2026-12-05_02-00-00.json").write_bytes(state)
    assert saved_state_whole(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-05_02-00-00.json").write_bytes(state[: len(state) // 2])
    assert not saved_state_whole(str(tmp_path))


def test_a_trial_of_two_workers_is_a_ray_train_run(ray_local, tmp_path):
    from jobs.shard import run_shard
    from jobs.tune import run_tune

    cfg = load_config(PipelineConfig, "configs/demo.yaml", SMALL + [
        f"work_dir={tmp_path}", "tune.trial_workers=2", "tune.space={k: [10]}", "tune.metric=stability"])
    run_shard(cfg.shard, progress=False)
    (trial,) = run_tune(cfg)["trials"]
    assert "error" not in trial and trial["workers"] == 2  # trained data-parallel, scored by rank 0
    assert 0 < trial["stability"] <= 1 and trial["clusters_used"] > 1


def test_ctrl_c_during_tune_names_the_experiment_to_resume_and_the_rerun_resumes_it(ray_local, tmp_path, capsys):
    """Ray Tune ends an experiment on Ctrl-C itself, with trials never started: `dicl tune` exits 130 and names the
    tune.name it chose, with which the same command resumes the experiment."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from jobs.tune import run_tune

    args = ["configs/demo.yaml", f"work_dir={tmp_path}", *SMALL, "train.joint_epochs=6", "tune.space={k: [6, 8, 10]}",
            "tune.max_concurrent=1"]
    assert main(["shard", *args, "--no-progress"]) == 0
    joined = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = tmp_path / "tune.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "tune", *args, "--no-progress"],
                                start_new_session=True, stdout=f, stderr=subprocess.STDOUT, env=joined)
    try:
        deadline = time.time() + 180
        while "trial 1/3" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    said = log.read_text()
    assert "Traceback" not in said and "TypeError" not in said, said
    name = re.search(r"interrupted: re-run the same command with tune\.name=(tune-\S+) to resume", said).group(1)
    capsys.readouterr()
    summary = run_tune(load_config(PipelineConfig, args[0], [*args[1:], f"tune.name={name}"]))
    assert f"tune: resuming experiment {name}" in capsys.readouterr().out
    assert sorted(t["values"]["k"] for t in summary["trials"]) == [6, 8, 10]


def test_trials_over_k_share_one_representation_stage_and_are_scored_on_its_neighbours(ray_local, tmp_path):
    """NMM with a representation stage, trials over k: the stage trains once, alone, as a run of its own
    (tune.share_representation), and every trial starts from it (train.representation_from). Each trial's modularity
    and silhouette come from its features' neighbours, and the trials say so (they train no stage of their own:
    without the copy they would score on pixels); where labels exist, those neighbours' purity is reported beside.
    The run of the stage alone cannot label."""
    from jobs.tune import run_tune

    args = ["configs/demo.yaml", f"work_dir={tmp_path}", *SMALL, "train.joint_epochs=2",
            "train.method.contrast_epochs=2", "train.method.neighbours=5", "tune.space={k: [8, 10]}", "tune.name=t"]
    assert main(["shard", *args, "--no-progress"]) == 0
    summary = run_tune(load_config(PipelineConfig, args[0], args[1:]))
    stage = summary["representation_from"]
    assert stage.endswith("/t-representation")
    learnt = checkpoints.load(checkpoints.resolve(stage))
    assert learnt["representation_only"] and {m["stage"] for m in learnt["history"]} == {"contrast"}
    assert main(["label", *args, f"label.checkpoint={stage}"]) == 2
    assert len(summary["trials"]) == 2
    for trial in summary["trials"]:
        assert trial["space"] == "representation" and 0 < trial["neighbour_purity_vs_labels"] <= 1, trial


def test_trials_keep_a_stage_each_where_the_space_or_the_setting_says_so():
    """The stage is shared only where the space searches nothing it reads, and tune.share_representation allows."""
    from jobs.tune import shared_representation

    args = ["train.method.contrast_epochs=2", "tune.space={k: [8, 10]}"]
    cfg = load_config(PipelineConfig, "configs/demo.yaml", args)
    for space in ({"lr": [1e-3, 3e-4]}, {"k": [8], "conv_widths": [[16, 32]]}, {"method": ["nmm", "vc"]}):
        assert shared_representation(cfg, cfg.train, space, "t") is cfg.train  # (it would train one: Ray is not up)
    off = load_config(PipelineConfig, "configs/demo.yaml", [*args, "tune.share_representation=false"])
    assert shared_representation(off, off.train, {"k": [8, 10]}, "t") is off.train
    none = load_config(PipelineConfig, "configs/demo.yaml", ["tune.space={k: [8, 10]}"])
    assert shared_representation(none, none.train, {"k": [8, 10]}, "t") is none.train
