"""Tune job: Ray Tune trains one trial per combination of `tune.space` and picks the winner without labels.

Each trial is one process on its own resources (a GPU where the cluster has them), or with tune.trial_workers > 1 a
Ray Train run of that many workers: it reads every shard (or the images of train.sample, the same for every trial;
a corpus beyond memory streams, as in the train job), trains with `clustering.engine.fit`, and scores its clusters
with a label-free score (`tune.metric`) along the run and at the end. With `tune.scheduler=asha`, Ray Tune's ASHA
stops the trials whose score trails at set epochs. Labels, where the shards carry them, are scored at the end too,
for the table only; they never choose. The job writes
`trials.json` (every trial's values and scores) and `best.yaml` (the winning train values, for the train job).
"""
from __future__ import annotations

import json
import os
import time

import ray
import ray.train
import torch
import yaml
from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.schedulers import ASHAScheduler

from clustering import engine, lease, metrics
from clustering.data import inputs, shards, storage
from clustering.comm import Comm
from clustering.config import (
    ConfigError,
    PipelineConfig,
    TrainConfig,
    TuneConfig,
    grid_values,
    probe_space,
    setting_path,
    train_section,
    trial_config,
)
from clustering.model.methods import predict_all

from .signals import resume_with
from .runtime import check_resources, credentials_out_of_runtime_envs, ray_train_environment, train_storage, want_gpu
from .train import check_run, run_train, worker_input

RESULT_KEYS = ("modularity", "modularity_x_evenness", "silhouette", "evenness", "stability", "clusters_used", "workers",
               "seconds", "space")


def run_trial(config: dict) -> None:
    """Runs in a Tune trial's actor: train one config on all shards (or on train.sample, the same for every trial),
    in this process, or with tune.trial_workers > 1 as a Ray Train run of its own (`trial_on_ray_train`)."""
    cfg = trial_of(config)
    if cfg.num_workers > 1:
        return trial_on_ray_train(config, cfg)
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.cpus_per_worker)
    data = inputs.open_input(cfg, shards.read_manifest(cfg.shards), Comm(), device, log=lambda s: None)
    train_and_score(config, cfg, data, Comm(), device, tune.report)


def trial_loop(config: dict) -> None:
    """Runs on every Ray Train worker of a multi-worker trial; rank 0's reports reach Tune (TuneReportCallback)."""
    cfg = trial_of(config)
    comm, device, data = worker_input(cfg)
    train_and_score(config, cfg, data, comm, device, ray.train.report)


def trial_of(config: dict) -> TrainConfig:
    """A trial's train config: the base with the values Tune chose for it."""
    return trial_config(TrainConfig(**config["base"]), {key: config[key] for key in config["searched"]})


def trial_on_ray_train(config: dict, cfg: TrainConfig) -> None:
    """A trial as a Ray Train run of cfg.num_workers workers (Ray 2.60's Train-in-Tune: the trial's function
    drives a TorchTrainer; TuneReportCallback passes the workers' reports on to Tune)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    ray_train_environment()  # this trial's actor makes the run
    path, filesystem = train_storage(storage.absolute(cfg.storage_path))
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if config["gpu"] else {})}
    trainer = TorchTrainer(
        trial_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=config["gpu"], resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{tune.get_context().get_experiment_name()}-{tune.get_context().get_trial_id()}",
                             storage_path=path, storage_filesystem=filesystem, callbacks=[TuneReportCallback()]))
    trainer.fit()  # (in a trial's thread: Ray Train installs no Ctrl-C handler of its own here)


def train_and_score(config: dict, cfg: TrainConfig, data, comm: Comm, device: torch.device, report) -> None:
    """Train; every `report_every` epochs once the run clusters, report the label-free score that chooses
    (`metric`, on a copy of the model) so that a scheduler can stop a poor trial early; at the end, report every
    score, and ACC/NMI/ARI where the shards carry labels. On several workers, each scores its own share (rank 0's
    reach Tune)."""
    x = data.sample  # every image held in memory, or the statistics' sample of a streamed corpus
    scores = metrics.LabelFreeScores(x.permute(0, 2, 3, 1).cpu().numpy(), config["score_sample"],  # graph: once
                                     space="backbone features", deskew=cfg.deskew)  # a frozen backbone's: features
    views = engine.views_of(x[torch.from_numpy(scores.index).to(device)])  # the same views in every trial
    t0 = time.perf_counter()


    labels = data.sample_labels
    known = labels >= 0

    def scored(model, names=None) -> tuple:  # (the clusters of x, their scores)
        clusters = predict_all(model, x)[0].argmax(1).cpu().numpy()
        view_clusters = predict_all(model, views)[0].argmax(1).cpu().numpy()
        learnt = engine.representation_of(cfg, model, x)
        space = scores if learnt is None else metrics.LabelFreeScores(learnt, config["score_sample"])  # its neighbours
        found = {**space(clusters, cfg.k, names, view_clusters), "space": space.space}
        if names is None and known.any():  # for information: how often the neighbours that score share a class
            found["neighbour_purity_vs_labels"] = space.purity(labels)
        return clusters, found

    def report_along(epoch: int, state: dict) -> None:
        found = scored(engine.model_now(state, x, comm), names=(config["metric"],))[1]
        report({"epoch": epoch, "final": False, "seconds": time.perf_counter() - t0, **found})

    model = engine.fit(data, cfg, comm, device, log=lambda s: None,
                       on_epoch=engine.while_clustering(cfg, config["report_every"], report_along))
    clusters, found = scored(model)
    final = {"epoch": engine.total_epochs(cfg), "final": True, "seconds": time.perf_counter() - t0,
             "workers": comm.world, **found}
    if known.any():  # shown beside the label-free scores; never used to choose
        final.update({f"{name}_vs_labels": v for name, v in metrics.scores(labels[known], clusters[known]).items()})
    report(final)


def scheduler(cfg: TuneConfig, longest: int):
    """Ray Tune's scheduler for `tune.scheduler`, on the epoch axis; `longest`: epochs of the longest trial."""
    if cfg.scheduler == "fifo":
        return None
    # By a third of a MNIST run the scores still misrank k too often (docs/results/HISTORY.md, "Stopping trials early")
    grace = cfg.grace_epochs or max(1, longest // 2)
    return ASHAScheduler(time_attr="epoch", max_t=max(longest, grace), grace_period=grace, reduction_factor=3)


def validated_space(base: TrainConfig, space: dict[str, list | dict]) -> dict[str, list | dict]:
    """Each listed value as the train config reads it (`1e-3` a float, not text), a distribution whose ends are
    valid as it is; or a ConfigError naming the value."""
    checked = {key: [trial_config(base, {key: v}).value(key) for v in values] for key, values in probe_space(space).items()}
    return {key: checked[key] if isinstance(value, list) else value for key, value in space.items()}


def search_space(cfg: TuneConfig, space: dict[str, list | dict]) -> dict:
    """Ray Tune's param space: a list is a grid (grid search) or a choice (Optuna); a distribution is Ray's."""
    def one(value):
        if isinstance(value, list):
            return tune.grid_search(value) if cfg.search == "grid" else tune.choice(value)
        (kind, args), = value.items()
        return tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return {key: one(value) for key, value in space.items()}


def searcher(cfg: TuneConfig):
    """Optuna's TPE (seeded), at most tune.max_concurrent trials at once; None for the grid (Ray's own)."""
    if cfg.search == "grid":
        return None
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory": TrialLines say it

    found = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    return ConcurrencyLimiter(found, cfg.max_concurrent) if cfg.max_concurrent else found


def trial_count(cfg: TuneConfig, space: dict) -> int:
    """How many trials the experiment runs: the grid of the lists, num_samples times; or Optuna's num_samples."""
    if cfg.search != "grid":
        return cfg.num_samples
    return cfg.num_samples * len(grid_values({k: v for k, v in space.items() if isinstance(v, list)}))


class TrialLines(tune.Callback):
    """One line as each trial ends, in place of Ray Tune's tables (the configs of every trial, the status every few
    seconds): what a user follows while the experiment runs."""

    def __init__(self, space: list[str], metric: str, total: int):
        self.space, self.metric, self.total, self.ended = space, metric, total, 0
        self.running: set[str] = set()  # trials started in this process and not yet ended: left so by Ctrl-C

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def line(self, trial, what: str) -> None:
        self.running.discard(trial.trial_id)
        self.ended += 1
        values = " ".join(f"{k}={show(trial.config[k])}" for k in self.space)
        print(f"trial {self.ended}/{self.total} {values}: {what}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if self.metric in result:
            stopped = "" if result.get("final") else f"stopped at epoch {result['epoch']}, "
            self.line(trial, f"{stopped}{self.metric} {result[self.metric]:.3f}")
        else:
            self.line(trial, "no result")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.line(trial, "failed")


def run_tune(cfg: PipelineConfig) -> dict:
    """Run every trial of `cfg.tune.space`; write trials.json and best.yaml under `cfg.tune.output`.
    Returns {"best": winning values, "trials": rows (best first), "best_yaml": URI}."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name train keys and values to try, e.g. "
                          "'tune.space={k: [8, 10, 12]}'")
    if "num_workers" in cfg.tune.space:
        raise ConfigError("tune.space cannot search num_workers: tune.trial_workers sets every trial's")
    base = cfg.train.model_copy(update={"shards": storage.absolute(cfg.train.shards), "num_workers": cfg.tune.trial_workers,
                                        "storage_path": storage.absolute(cfg.train.storage_path)})
    manifest = shards.read_manifest(base.shards)  # fails early, naming the folder, when shards are missing
    space = validated_space(base, cfg.tune.space)
    probes = grid_values(probe_space(space))  # every trial of a grid; the distributions' ends
    trials = [trial_config(base, values) for values in probes]
    for values, trial in zip(probes, trials):  # every trial valid before any starts
        try:
            check_run(trial, manifest)
        except ValueError as e:
            raise ConfigError(f"tune.space: the trial {values} cannot run: {e}") from None
    gpu = want_gpu(cfg.train.use_gpu)
    check_resources(f"tune (a trial of {base.num_workers} workers)", {"CPU": base.cpus_per_worker, "GPU": int(gpu)},
                    base.num_workers)
    with lease.hold(cfg.tune.output, "dicl tune"):
        name = experiment_name(cfg)
        shared = shared_representation(cfg, base, space, name)
        if shared is not base:
            base, trials = shared, [trial_config(shared, values) for values in probes]
        return search(cfg, base, space, trials, gpu, name)


def experiment_name(cfg: PipelineConfig) -> str:
    name = cfg.tune.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    if not cfg.tune.name:
        resume_with("tune.name", name)
    return name


# what a representation stage does not read: a space of these alone can share one stage among its trials
AFTER_THE_STAGE = {"k", "over_cluster", "joint_epochs", "restarts", "restart_epochs", "deskew", "neighbours",
                   "neighbour_weight", "selflabel_epochs", "selflabel_threshold", "freeze_representation",
                   "consistency_weight", "instance_weight", "pi_momentum", "heads", "over_k", "balance_weight",
                   "decoded", "pretrain_epochs", "rec_weight", "target_every"}


def shared_representation(cfg: PipelineConfig, base: TrainConfig, space: dict, name: str) -> TrainConfig:
    """The trials' base: where they can share it (tune.share_representation), the representation stage trains once,
    alone, as the run `name`-representation (resumed with the experiment), and the trials start from it."""
    stage = getattr(base.method, "contrast_epochs", 0)
    searched = {key.removeprefix("method.") for key in space}
    if not (cfg.tune.share_representation and stage and not base.representation_from and searched <= AFTER_THE_STAGE):
        return base
    alone = {"joint_epochs": 0, "selflabel_epochs": 0}  # the stage alone: the autoencoders' pretraining follows it
    if "pretrain_epochs" in type(base.method).model_fields:
        alone["pretrain_epochs"] = 0
    run = run_train(trial_config(base, alone).model_copy(update={"name": f"{name}-representation",
                                                                  "num_workers": cfg.train.num_workers}))
    folder = run.checkpoint.rsplit("/", 1)[0]
    print(f"tune: the representation stage trained once ({stage} epochs, run {folder}); every trial starts from it "
          "(tune.share_representation)", flush=True)
    return trial_config(base, {"contrast_epochs": 0, "representation_from": folder})


def saved_state_whole(experiment: str) -> bool:
    """Whether the newest of the experiment's saved states reads whole. Ray Tune copies its staging folder to storage
    in place at every save, so a run killed in the middle of a copy leaves the file cut short on local storage."""
    states = [uri for uri in storage.list_files(experiment, ".json")
              if uri.rsplit("/", 1)[-1].startswith("experiment_state-")]
    try:
        json.loads(storage.read_bytes(max(states)))
    except ValueError:  # no state, or not JSON
        return False
    return True


def search(cfg: PipelineConfig, base: TrainConfig, space: dict[str, list | dict], trials: list[TrainConfig],
           gpu: bool, name: str) -> dict:
    """Run the experiment `name` (or resume it: tune.name), rank its trials, write trials.json and best.yaml."""
    tuner = make_tuner(cfg, base, space, trials, gpu, name)
    # Ray Tune's newer console output prints boxes and hints even at verbose=0; the older one is silent there, and
    # TrialLines says what matters.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with credentials_out_of_runtime_envs():
        results = tuner.fit()
    if interrupted(tuner, results, trial_count(cfg.tune, space)):
        raise KeyboardInterrupt
    ordered = ranked(results, sorted(space), cfg.tune.metric)
    best = ordered[0]["values"]
    storage.write_bytes(storage.join(cfg.tune.output, "trials.json"),
                        json.dumps({"metric": cfg.tune.metric, "trials": ordered}, indent=1).encode())
    best_yaml = storage.join(cfg.tune.output, "best.yaml")
    section = train_section(best, trial_config(base, best).method.name)
    storage.write_bytes(best_yaml, yaml.safe_dump({"train": section}, sort_keys=True).encode())
    return {"best": best, "trials": ordered, "best_yaml": best_yaml, "metric": cfg.tune.metric,
            "representation_from": base.representation_from}


def make_tuner(cfg: PipelineConfig, base: TrainConfig, space: dict[str, list | dict], trials: list[TrainConfig],
               gpu: bool, name: str) -> tune.Tuner:
    """A new experiment, or the one named tune.name restored (its finished and stopped trials kept)."""
    runs = storage.absolute(cfg.train.storage_path)
    path, filesystem = train_storage(runs)
    # A trial of one worker trains in its own actor; a trial of several drives a Ray Train run whose workers ask
    # for the CPUs and GPUs, so its own actor asks for none of them (Tune wants some resource: a little memory).
    one = base.num_workers == 1
    trainable = tune.with_resources(run_trial, {"cpu": cfg.train.cpus_per_worker, "gpu": int(gpu)} if one
                                    else {"cpu": 0, "memory": 64 * 2**20})
    param_space = {**search_space(cfg.tune, space), "base": base.model_dump(mode="json"), "searched": sorted(space),
                   "gpu": gpu,
                   "score_sample": cfg.tune.score_sample, "metric": cfg.tune.metric,
                   "report_every": cfg.tune.report_every}
    experiment = f"{path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        # Trials that finished, or that the scheduler stopped, stay as they are; the others run (from the start).
        if saved_state_whole(storage.join(runs, name)):
            print(f"tune: resuming experiment {name} (tune.name)", flush=True)
        else:  # Ray Tune then logs the error and starts the experiment over, in the same folder
            print(f"tune: the saved state of experiment {name} (tune.name) is cut short, as when a run is killed while "
                  "saving it: every trial runs again", flush=True)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, param_space=param_space,
                                  storage_filesystem=filesystem)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max", search_alg=searcher(cfg.tune),
                                    scheduler=scheduler(cfg.tune, max(map(engine.total_epochs, trials))),
                                    num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent or None,
                                    # a trial's actor trains the next trial (every trial asks the same
                                    # resources): no new process importing torch and the jobs each time
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=filesystem, verbose=0,
                                  callbacks=[TrialLines(sorted(space), cfg.tune.metric, trial_count(cfg.tune, space))]))


def interrupted(tuner: tune.Tuner, results, expected: int) -> bool:
    """Whether Ray Tune ended the experiment on Ctrl-C (it does so itself, keeping its state to resume, and returns
    as if done): some trial started and never ended, or some was never made."""
    # The TrialLines that ran: a restored experiment's is unpickled from its state (Ray 2.60 has no public getter).
    lines = next(c for c in tuner._local_tuner.get_run_config().callbacks if isinstance(c, TrialLines))
    return bool(lines.running) or len(results) < expected


def ranked(results, searched: list[str], metric: str) -> list[dict]:
    """The trials as rows, finished first by the score, then those the scheduler stopped (their scores are from
    then), then errors; an error when none has a score."""
    rows = []
    for result in results:
        m = result.metrics or {}
        values = {key: result.config[key] for key in searched}
        if result.error or metric not in m:
            cause = str(result.error or "no result").strip().splitlines()[-1]  # Ray's traceback ends with it
            rows.append({"values": values, "error": cause})
            continue
        row = {"values": values, **{key: m[key] for key in m if key in RESULT_KEYS or key.endswith("_vs_labels")}}
        rows.append(row if m["final"] else {**row, "stopped_at_epoch": m["epoch"]})
    scored = sorted((r for r in rows if "error" not in r), key=lambda r: ("stopped_at_epoch" in r, -r[metric]))
    if not scored:
        raise RuntimeError(f"all {len(rows)} tune trials failed: {rows[0]['error']}")
    return scored + [r for r in rows if "error" in r]


def show(value) -> str:
    """A value as an override takes it and a person reads it: lists without spaces, so the shell keeps
    `train.key=[a,b]` one word; floats in 4 significant digits (an lr drawn from a distribution has 16)."""
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(summary: dict) -> str:
    """The trials, best first: searched values, label-free scores, and ACC where labels exist."""
    trials = summary["trials"]
    lines = [f"Trials (chosen by {summary['metric']}, no labels; best first)"]
    for i, r in enumerate(trials):
        values = " ".join(f"{k}={show(v)}" for k, v in r["values"].items())
        if "error" in r:
            lines.append(f"  {values:<36} FAILED: {r['error']}")
        elif "stopped_at_epoch" in r:
            lines.append(f"  {values:<36} stopped at epoch {r['stopped_at_epoch']}: {summary['metric']} "
                         f"{r[summary['metric']]:.3f}  ({r['seconds']:.0f}s)")
        else:
            acc = f"  ACC {r['acc_vs_labels']:.3f}" if "acc_vs_labels" in r else ""
            product = f" (x evenness {r['modularity_x_evenness']:.3f})" if "modularity_x_evenness" in r else ""
            lines.append(f"{'*' if i == 0 else ' '} {values:<36} modularity {r['modularity']:.3f}{product}  silhouette "
                         f"{r['silhouette']:.3f}  evenness {r['evenness']:.3f}  stability {r['stability']:.3f}  "
                         f"clusters {r['clusters_used']}{acc}  ({r['seconds']:.0f}s)")
    stopped = sum("stopped_at_epoch" in r for r in trials)
    failed = sum("error" in r for r in trials)
    best = sorted(summary["best"].items(), key=lambda kv: kv[0] != "method")  # the method before its settings
    overrides = " ".join(f"train.{setting_path(k)}={show(v)}" for k, v in best)
    seconds = sum(r.get("seconds", 0) for r in trials)
    counts = f"{len(trials) - stopped - failed} finished, {stopped} stopped early, {failed} failed"
    lines += [f"{len(trials)} trials: {counts}; {seconds:.0f} trial-seconds", f"best: {overrides}",
              f"  written to {summary['best_yaml']}"]
    return "\n".join(lines)
