"""What the user sees while a Ray job runs: our own lines and a progress bar with an ETA, Ray's logs in a file.

Ray's own output (worker and actor stdout, Ray Train's and Ray Data's INFO lines, core-worker messages) is kept off
the terminal unless -v: workers' output stays in Ray's session logs, and the driver's Ray loggers write to the
command's log file. Training lines reach the driver through a small actor (`Board`) that the workers post to and
the driver drains, so they print once, beside a bar of epochs done.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

import ray
from tqdm import tqdm

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
QUIET = {"log": None}  # the command's log file, where Ray's own output goes unless -v (set by runtime.init_ray)


def ray_logs_to_file(path: str) -> None:
    """The driver's Ray loggers write to `path` instead of the terminal."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        log = logging.getLogger(name)
        for h in list(log.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                log.removeHandler(h)
        log.addHandler(handler)
        log.propagate = False


@contextmanager
def native_lines_to_log() -> Iterator[TextIO]:
    """While Ray Data runs a job's actor pool, the process's fd 2, where Ray's C++ core worker writes (e.g. the
    "constructor arguments in the object store" line of ray#53727, at every pool's start), goes to the command's log
    file; yields the terminal's stderr for our bar. Without a log file (-v) everything stays on the terminal."""
    if not QUIET["log"]:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with open(QUIET["log"], "a") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


@contextmanager
def pool_bar(total: int, desc: str, show: bool) -> Iterator[tqdm]:
    """The bar of a job's actor pool (label, features): images done, on the terminal, while Ray's native lines go to
    the log (`native_lines_to_log`)."""
    with native_lines_to_log() as terminal, tqdm(total=total, desc=desc, unit="img", disable=not show,
                                                  dynamic_ncols=True, file=terminal) as bar:
        yield bar


def session_logs() -> str | None:
    """The folder of this Ray session's logs (every worker's output), where this process can see it."""
    try:
        node = ray._private.worker.global_worker.node
        return f"{node.get_session_dir_path()}/logs"
    except Exception:  # noqa: BLE001 - a joined cluster's session folder lives on its head node
        return None


@ray.remote(num_cpus=0)
class Board:
    """Lines posted by training workers, taken by the driver."""

    def __init__(self):
        self.lines: list[str] = []

    def post(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


EPOCH = re.compile(r"^epoch (\d+)/(\d+) ")


@contextmanager
def training_lines(total_epochs: int, show_bar: bool, desc: str = "train") -> Iterator[object]:
    """A Board for the workers of one run; its lines print on the driver as they come, above a bar of epochs
    (with the ETA) when `show_bar`. Yields the actor handle, for the train loop's config."""
    board = Board.remote()
    bar = tqdm(total=total_epochs, desc=desc, unit="epoch", disable=not show_bar, dynamic_ncols=True)
    stop = threading.Event()

    def show(line: str) -> None:
        m = EPOCH.match(line)
        if m:
            bar.update(int(m.group(1)) - bar.n)
        if show_bar:
            tqdm.write(line)
        else:
            print(line, flush=True)

    def drain() -> None:
        for line in ray.get(board.take.remote()):
            show(line)

    def pump() -> None:
        while not stop.wait(0.5):
            try:
                drain()
            except Exception:  # noqa: BLE001 - the run's own error is what the user needs; lines are best effort
                return

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            drain()
        except Exception:  # noqa: BLE001
            pass
        bar.close()
        ray.kill(board)


def poster(board) -> Callable[[str], None]:
    """On a worker: a log function that posts to the driver's Board (or prints, without one)."""
    if board is None:
        return lambda s: print(s, flush=True)
    return lambda s: board.post.remote(s)
