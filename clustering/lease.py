"""One writer per output: a lock object (`_LOCK.json`) beside the output, created only where none exists
(storage.create), refreshed while its holder runs, and taken over only once its holder is gone.

A second run into the same output is refused with a message naming the first (docs/DESIGN.md §6: concurrent runs must
not mix their outputs). A holder is gone when, on the same host, its process no longer exists (a killed driver:
the rerun proceeds at once), or, from another host, when it has not refreshed the lock for STALE_S seconds.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from .data import storage

LOCK = "_LOCK.json"
BEAT_S = 15.0  # how often a holder refreshes its lock
STALE_S = 120.0  # a lock not refreshed for this long (by a holder on another host) is abandoned


class Busy(storage.StorageError):
    """Another run holds the output."""


def alive(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of another user: it exists
            return True
        return True
    return time.time() - float(holder.get("beat", 0)) < STALE_S


def read_holder(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):  # gone meanwhile, or half-written by a dying holder
        return None


@contextmanager
def hold(folder: str, what: str) -> Iterator[str]:
    """Hold `folder`'s lock for the duration of the block; yields this holder's id. A folder that cannot be written
    (a wrong bucket, missing credentials) fails first, naming it (storage.check_writable)."""
    storage.check_writable(folder)
    uri = storage.join(folder, LOCK)
    me = {"id": uuid.uuid4().hex, "what": what, "host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "beat": time.time()}
    if not storage.create(uri, json.dumps(me).encode()):
        other = read_holder(uri)
        if other is not None and alive(other):
            raise Busy(f"{folder} is in use by another run ({other.get('what')}, process {other.get('pid')} on "
                       f"{other.get('host')}, since {other.get('since')}): wait for it to finish, or write elsewhere "
                       f"(another work_dir, train.name or output). If that run is gone, delete {uri}.")
        storage.remove(uri)  # its holder is gone: take it over, unless another run does so first
        if not storage.create(uri, json.dumps(me).encode()):
            raise Busy(f"{folder} was just taken by another run; wait for it to finish, or write elsewhere")
    storage.sweep_temporary(folder)  # ours now: what a killed writer left is stale
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                holder = read_holder(uri)
                if holder is None or holder.get("id") != me["id"]:
                    return  # taken over (we were thought gone): nothing of ours to refresh
                storage.write_bytes(uri, json.dumps({**me, "beat": time.time()}).encode())
            except Exception:  # noqa: BLE001 - storage unreachable for now: try again at the next beat
                continue

    refresher = threading.Thread(target=beat, name="lease-beat", daemon=True)
    refresher.start()
    try:
        yield me["id"]
    finally:
        stop.set()
        refresher.join()
        try:
            holder = read_holder(uri)
            if holder is not None and holder.get("id") == me["id"]:
                storage.remove(uri)
        except Exception:  # noqa: BLE001 - storage gone: keep the run's own error; a rerun takes the lock over
            pass
