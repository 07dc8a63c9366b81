"""dicl: the command line. Every command reads one YAML (sections shard/train/label/tune) plus key=value overrides.

  dicl pipeline configs/demo.yaml                 shard -> [tune ->] train -> label -> report
  dicl shard configs/mnist.yaml shard.source=DIR  one stage alone
  dicl train configs/demo.yaml train.k=12 train.num_workers=2
  dicl tune configs/demo.yaml "tune.space={k: [8, 10, 12]}"   one trial per value; picked without labels
  dicl label configs/demo.yaml label.checkpoint=RUN_OR_CHECKPOINT_DIR

exit codes: 0 done; 1 a failure of ours (the traceback is in the log file named); 2 the input cannot work (a config,
a source, storage, credentials, a checkpoint, a resource request: the message says which); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

COMMANDS = ("pipeline", "shard", "tune", "train", "label")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dicl", description="Deep image clustering at cluster scale.",
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config and dotted overrides, e.g. train.k=12 work_dir=s3://bucket/run1")
    p.add_argument("--address", default=None, help="join this Ray cluster (as RAY_ADDRESS does); without either, "
                                                   "a private Ray starts in this process")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the private Ray (ignored on a cluster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="print the full traceback of an error")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return p.parse_intermixed_args(argv)  # options anywhere, as in `dicl train --no-progress train.k=12`


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deep-image-clustering")
    except PackageNotFoundError:
        return "unknown"


def run(ns: argparse.Namespace) -> None:
    from clustering.config import PipelineConfig, load_config

    path = ns.args[0] if ns.args and ns.args[0].endswith((".yaml", ".yml")) else None
    overrides = ns.args[1:] if path else ns.args
    cfg = load_config(PipelineConfig, path, overrides)

    from . import runtime

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    runtime.init_ray(ns.num_cpus, ns.address)
    if ns.command == "pipeline":
        from .pipeline import run_pipeline

        run_pipeline(cfg, progress=not ns.no_progress)
    elif ns.command == "shard":
        from .shard import describe, run_shard

        print(describe(run_shard(cfg.shard, progress=not ns.no_progress), cfg.shard.output))
    elif ns.command == "train":
        from .train import run_train

        r = run_train(cfg.train)
        print(f"run {r.name} finished in {r.seconds:.0f}s\ncheckpoint {r.checkpoint}")
    elif ns.command == "tune":
        from .tune import format_table, run_tune

        print(format_table(run_tune(cfg)))
    elif ns.command == "label":
        from .label import run_label

        print(json.dumps(run_label(cfg.label), indent=1))


def user_errors() -> tuple[type, ...]:
    """Errors of the user's input (exit 2): a config, a source, storage, a checkpoint, a resource request."""
    from clustering.config import ConfigError
    from clustering.sources import SourceError
    from clustering.storage import StorageError

    from .runtime import ResourceError

    return ConfigError, SourceError, StorageError, ResourceError, FileNotFoundError, PermissionError, ValueError


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


def log_error(command: str, e: BaseException) -> str:
    """The full traceback, into a log file (DICL_LOG_DIR, default outputs/logs); returns its path."""
    folder = os.environ.get("DICL_LOG_DIR", os.path.join("outputs", "logs"))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"dicl-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(e)))
    return path


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    try:
        run(ns)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume (finished shards and checkpoints are kept)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends as one line, the traceback in a log file
        cause = root_cause(e)
        if isinstance(cause, KeyboardInterrupt):
            return 130
        code = 2 if isinstance(cause, user_errors()) else 1
        log = log_error(ns.command, e)
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
