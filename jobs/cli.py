"""dicl: the command line. Every command reads one YAML (sections shard/train/label/tune) plus key=value overrides.

  dicl pipeline configs/demo.yaml                 shard -> [tune ->] train -> label -> report
  dicl shard configs/mnist.yaml shard.source=DIR  one stage alone
  dicl train configs/demo.yaml train.k=12 train.num_workers=2
  dicl tune configs/demo.yaml "tune.space={k: [8, 10, 12]}"   one trial per value; picked without labels
  dicl label configs/demo.yaml label.checkpoint=RUN_OR_CHECKPOINT_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

COMMANDS = ("pipeline", "shard", "tune", "train", "label")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dicl", description="Deep image clustering at cluster scale.",
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config and dotted overrides, e.g. train.k=12 work_dir=s3://bucket/run1")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for an in-process Ray (ignored with RAY_ADDRESS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(ns: argparse.Namespace) -> None:
    from clustering.config import PipelineConfig, load_config

    path = ns.args[0] if ns.args and ns.args[0].endswith((".yaml", ".yml")) else None
    overrides = ns.args[1:] if path else ns.args
    cfg = load_config(PipelineConfig, path, overrides)

    from . import runtime

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    runtime.init_ray(ns.num_cpus)
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


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    from clustering.config import ConfigError
    from clustering.sources import SourceError
    from clustering.storage import StorageError

    try:
        run(ns)
    except (ConfigError, SourceError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Ray wraps errors raised in tasks and workers; show the cause, not the wrapper
        cause = getattr(e, "cause", None) or e.__cause__
        if isinstance(cause, (SourceError, StorageError, FileNotFoundError, ValueError)):
            print(f"error: {cause}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
