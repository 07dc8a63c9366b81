"""dicl: the command line. Every command reads one YAML (sections shard/train/label/predict/tune) plus
key=value overrides.

  dicl pipeline configs/demo.yaml                 shard -> [tune ->] train -> label -> report
  dicl shard configs/mnist.yaml shard.source=DIR  one stage alone
  dicl shard configs/demo.yaml "shard.source=s3://bucket/laion/{00000..00099}.tar"   index tars in place
  dicl train configs/demo.yaml train.k=12 train.num_workers=2
  dicl tune configs/demo.yaml "tune.space={k: [8, 10, 12]}"   one trial per value; picked without labels
  dicl features configs/pretrained.yaml          a frozen backbone's features of every image, once (the cache)
  dicl label configs/demo.yaml                    label every shard (label.checkpoint empty: the latest run)
  dicl predict RUN_OR_CHECKPOINT photos/ a.jpg s3://bucket/tars/   new images, in this process (no Ray)
  dicl config [configs/demo.yaml] [key=value]     every key: its value, default and meaning
  dicl COMMAND --help                             what a command does, and its keys

exit codes: 0 done; 1 a failure of ours (the traceback is in the log file named); 2 the input cannot work (a config,
a source, storage, credentials, a checkpoint, a resource request: the message says which); 130 interrupted (Ctrl-C);
143 terminated (SIGTERM, as schedulers and `ray job stop` send it). After 130 or 143, the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from .signals import EXIT_TERMINATED, resume_hint, terminate_as_interrupt, was_terminated

# command -> (what it does, the config sections it reads)
COMMANDS = {
    "pipeline": ("shard -> tune (when tune.space is set) -> train -> label -> report, all under work_dir",
                 ("shard", "tune", "train", "label")),
    "shard": ("write WebDataset shards and manifest.json from an image folder, MNIST IDX, .npz or sklearn:digits; "
              "or index a WebDataset corpus (a folder/prefix of tars, a brace pattern) where it lies", ("shard",)),
    "tune": ("train one trial per point of tune.space and pick the best without labels (trials.json, best.yaml)",
             ("tune", "train")),
    "train": ("train a deep clustering model with Ray Train on train.num_workers workers; prints its checkpoint",
              ("train",)),
    "features": ("compute a frozen pretrained backbone's (train.encoder) features of every shard once, into the feature "
                 "cache train.features (Ray Data, with the label job's pool settings); train, tune and label read it",
                 ("train", "label")),
    "label": ("label every shard with a finished run (Ray Data), one Parquet part per shard, then _SUCCESS.json",
              ("label",)),
    "predict": ("label new images with a run or checkpoint, in this process: files, folders, s3:// prefixes or "
                "WebDataset tars (no manifest needed); the label job's Parquet columns", ("predict",)),
    "config": ("print every config key with its value, default and meaning (after the YAML and overrides)",
               ("shard", "train", "label", "predict", "tune")),
}


NO_RAY = ("predict", "config")  # commands that start no Ray: they take none of its options


def options(p: argparse.ArgumentParser, ray: bool = True) -> None:
    if ray:
        p.add_argument("--address", default=None, help="join this Ray cluster (as RAY_ADDRESS does); without either, "
                                                       "a private Ray starts in this process")
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the private Ray (ignored on a cluster)")
        p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with the private Ray "
                                                                "(http://127.0.0.1:8265; a cluster has its own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (there are none when stderr is "
                                                               "not a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the full traceback of an error, and let Ray's own "
                                                              "output through to the terminal")
    p.add_argument("--version", action="version", version=f"dicl {package_version()}")


def command_parser(command: str) -> argparse.ArgumentParser:
    what, sections = COMMANDS[command]
    usage = "RUN_OR_CHECKPOINT INPUT [INPUT ...] " if command == "predict" else ""
    p = argparse.ArgumentParser(prog=f"dicl {command}", description=what,
                                usage=f"%(prog)s {usage}[CONFIG.yaml] [key=value ...] [options]",
                                epilog=keys_help(sections, brief=command != "config", names_only=command == "pipeline"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="ARG", help="a YAML config and dotted overrides, e.g. train.k=12 "
                                                          "work_dir=s3://bucket/run1" +
                   ("; first the run or checkpoint, then the inputs" if command == "predict" else ""))
    options(p, ray=command not in NO_RAY)
    return p


def keys_help(sections: tuple[str, ...], brief: bool = True, names_only: bool = False) -> str:
    from clustering.config import PipelineConfig

    from .config_help import describe_keys, key_names

    if names_only:  # the pipeline reads every section: their meaning is a stage's --help, or dicl config, away
        return ("config keys (`dicl config` prints each with its value, default and meaning; `dicl STAGE --help` "
                "a stage's):\n" + key_names(PipelineConfig(), sections))
    return "config keys (dicl config prints them with their values):\n" + describe_keys(PipelineConfig(), sections,
                                                                                     brief=brief)


def parse(argv: list[str]) -> argparse.Namespace:
    command = next((a for a in argv if a in COMMANDS), None)
    if command not in COMMANDS:
        top = argparse.ArgumentParser(prog="dicl", description="Deep image clustering at cluster scale.",
                                      usage="dicl COMMAND [CONFIG.yaml] [key=value ...] [options]",
                                      epilog=__doc__.split("\n", 3)[3], formatter_class=argparse.RawDescriptionHelpFormatter)
        top.add_argument("command", choices=list(COMMANDS))
        options(top)
        top.parse_args(argv)  # --help, --version, or an error naming the commands
        top.error(f"choose a command: {', '.join(COMMANDS)}")
    rest = list(argv)
    rest.remove(command)
    ns = command_parser(command).parse_intermixed_args(rest)  # options anywhere: `dicl train --no-progress k=12`
    ns.command = command
    return ns


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deep-image-clustering")
    except PackageNotFoundError:
        return "unknown"


def show_progress(ns: argparse.Namespace) -> bool:
    """Bars on a terminal (stderr), unless --no-progress; a log (as under `ray job submit`) gets the lines alone."""
    return not ns.no_progress and sys.stderr.isatty()


def split_args(args: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(the YAML config, the key=value overrides, the rest: predict's run and inputs)."""
    config = next((a for a in args if a.endswith((".yaml", ".yml"))), None)
    overrides = [a for a in args if a != config and "=" in a and a.split("=", 1)[0].replace(".", "").replace("_", "").isalnum()]
    rest = [a for a in args if a != config and a not in overrides]
    return config, overrides, rest


def run(ns: argparse.Namespace) -> None:
    from clustering.config import ConfigError, PipelineConfig, load_config

    path, overrides, rest = split_args(ns.args)
    if rest and ns.command != "predict":
        raise ConfigError(f"{rest[0]!r} is neither a YAML config nor a key=value override (e.g. train.k=12)")
    cfg = load_config(PipelineConfig, path, overrides)
    if ns.command == "config":
        from .config_help import describe_keys

        print(describe_keys(cfg, COMMANDS["config"][1], brief=False))
        return
    if ns.command == "predict":
        from clustering.estimator import DeepClusterer
        from clustering.predict import describe, run_predict

        if len(rest) < 2:
            raise ConfigError("dicl predict needs a run or checkpoint folder, then one or more inputs "
                              "(files, folders, s3:// prefixes or WebDataset tars)")
        model = DeepClusterer.load(rest[0], device=cfg.predict.device)
        print(describe(run_predict(model, rest[1:], cfg.predict, progress=show_progress(ns)), cfg.predict.output))
        return

    from . import runtime

    runtime.init_ray(ns.num_cpus, ns.address, quiet_into=None if ns.verbose else ns.log, dashboard=ns.dashboard)
    run_on_ray(ns, cfg)
    from .progress import session_logs

    where = ([f"log: {ns.log}"] if os.path.exists(ns.log) else []) + [f"Ray's logs: {d}" for d in [session_logs()] if d]
    if where:
        print("; ".join(where), file=sys.stderr)


def run_on_ray(ns: argparse.Namespace, cfg) -> None:
    progress = show_progress(ns)
    if ns.command == "pipeline":
        from .pipeline import run_pipeline

        run_pipeline(cfg, progress=progress)
    elif ns.command == "shard":
        from .shard import describe, run_shard

        print(describe(run_shard(cfg.shard, progress=progress), cfg.shard.output))
    elif ns.command == "train":
        from .train import run_train

        r = run_train(cfg.train, progress=progress)
        print(f"run {r.name} finished in {r.seconds:.0f}s\ncheckpoint {r.checkpoint}")
        if r.metrics.get("representation_only"):
            print(f"a representation alone: cluster from it with train.representation_from={r.checkpoint}")
    elif ns.command == "tune":
        from .tune import format_table, run_tune

        print(format_table(run_tune(cfg)))
    elif ns.command == "features":
        from .features import describe, run_features

        print(describe(run_features(cfg.train, cfg.label, progress=progress), cfg.train.feature_cache))
    elif ns.command == "label":
        from .label import describe, run_label

        print(describe(run_label(cfg.label, runs=cfg.train.storage_path, progress=progress), cfg.label.output))


def user_errors() -> tuple[type, ...]:
    """Errors of the user's input (exit 2): a config, a source, storage, a checkpoint, a resource request."""
    from clustering.config import ConfigError
    from clustering.data.sources import SourceError
    from clustering.data.storage import StorageError

    from .runtime import ClusterError, ResourceError

    return (ConfigError, SourceError, StorageError, ResourceError, ClusterError, FileNotFoundError, PermissionError,
            ValueError)


def root_cause(e: BaseException) -> BaseException:
    """The error that started it: Ray wraps an error raised in a task or a worker (RayTaskError.cause, Ray Train's
    WorkerGroupError.worker_failures, ControllerError.controller_failure, Tune's TuneError), and a worker's error
    arrives wrapped again. Unwrapped until a plain error is left."""
    for _ in range(10):  # bounded: wrappers nest a few levels at most
        failures = getattr(e, "worker_failures", None)
        inner = (next(iter(failures.values())) if failures else None) or getattr(e, "controller_failure", None) \
            or getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException) or inner is e:
            return e
        e = inner
    return e


def log_path(command: str) -> str:
    """This command's log file (DICL_LOG_DIR, default outputs/logs): Ray's driver logs, and the traceback of an
    error. Created when first written."""
    folder = os.environ.get("DICL_LOG_DIR", os.path.join("outputs", "logs"))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"dicl-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def log_error(path: str, e: BaseException) -> str:
    with open(path, "a") as f:
        f.write("".join(traceback.format_exception(e)))
    return path


def interrupted(e: KeyboardInterrupt) -> int:
    """Ctrl-C (130) or SIGTERM (143): one line, and the exit code a shell would report."""
    term = was_terminated(e)
    print(f"{'terminated (SIGTERM)' if term else 'interrupted'}: {resume_hint()} (finished shards, parts and "
          "checkpoints are kept)", file=sys.stderr)
    return EXIT_TERMINATED if term else 130


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    ns.log = log_path(ns.command)
    terminate_as_interrupt()
    try:
        run(ns)
    except KeyboardInterrupt as e:
        return interrupted(e)
    except Exception as e:  # noqa: BLE001 - every error ends as one line, the traceback in a log file
        cause = root_cause(e)
        if isinstance(cause, KeyboardInterrupt):
            return interrupted(cause)
        code = 2 if isinstance(cause, user_errors()) else 1
        log = log_error(ns.log, e)
        if ns.verbose:
            traceback.print_exception(e)
        message = str(cause).strip() or type(cause).__name__
        kind = "" if code == 2 else f"{type(cause).__name__}: "
        print(f"error: {kind}{message}\n(full traceback in {log}{'' if ns.verbose else '; -v prints it'})",
              file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
