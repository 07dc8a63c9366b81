"""SIGTERM, as schedulers, `timeout`, Kubernetes and `ray job stop` send it, ends a command as Ctrl-C does: finished
shards, parts and checkpoints are kept, the leases are released, one line says how to resume, and the exit code is
143 (128 + SIGTERM, as a shell reports a process it ended)."""
from __future__ import annotations

import signal
import threading

EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwound as a KeyboardInterrupt, so every `finally` (leases, temporary files) runs."""


_received = threading.Event()


def _raise_terminated(signum, frame) -> None:
    _received.set()  # Ray's ray.get turns the error raised here into a plain KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def was_terminated(e: BaseException) -> bool:
    """Whether the KeyboardInterrupt `e` unwinds a SIGTERM rather than a Ctrl-C."""
    return isinstance(e, Terminated) or _received.is_set()


def terminate_as_interrupt() -> None:
    """Take SIGTERM in this (main) thread as `Terminated`. Called again after ray.init: Ray's core worker installs a
    handler of its own that prints a native stack dump and aborts (exit 134)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


_resume_with: dict[str, str] = {}


def resume_with(key: str, value: str) -> None:
    """An override the re-run needs to resume what this command started under a name it chose itself
    (train.name, tune.name): the interrupted message names it."""
    _resume_with[key] = value


def resume_hint() -> str:
    """How to resume: 're-run the same command', with the overrides the re-run needs."""
    extra = " ".join(f"{k}={v}" for k, v in _resume_with.items())
    return "re-run the same command" + (f" with {extra}" if extra else "") + " to resume"
