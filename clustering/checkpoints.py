"""Checkpoints of a run: `model.pt` in a `checkpoint_NNNNNN` folder of the run's folder (as Ray Train writes them),
or in any folder `DeepClusterer.save` was given. Tensors and plain data only: loaded with weights_only=True."""
from __future__ import annotations

import io

import torch

from .data import storage

CHECKPOINT_FILE = "model.pt"


def save(state: dict, folder: str) -> str:
    """Write a checkpoint dict as folder/model.pt (atomic); returns the folder."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(folder, CHECKPOINT_FILE), buf.getvalue())
    return folder


def load(uri: str) -> dict:
    """A checkpoint folder/URI -> its state dict."""
    return load_file(storage.join(uri, CHECKPOINT_FILE))


def load_any(uri: str) -> dict:
    """The state dict of a checkpoint file (a .pt: model.pt, or where benchmarks/quality.py keeps a run), a checkpoint
    folder, or a run folder (its newest checkpoint)."""
    return load_file(uri) if uri.endswith(".pt") else load(resolve(uri))


def load_file(path: str) -> dict:
    data = storage.read_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and weights-only errors all mean the same to the user
        raise ValueError(f"{path} is not a checkpoint written by dicl "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "spec" not in state or "model" not in state:
        raise ValueError(f"{path} is not a checkpoint written by dicl (it lacks the model and its spec)")
    return state


def load_finished(uri: str) -> dict:
    """A checkpoint dict that can label: its run's end-of-run step (k-means, NMM's normalisers) is in it."""
    state = load(uri)
    if state.get("representation_only"):
        raise ValueError(f"{uri} is a run that learnt a representation alone (train.joint_epochs=0), with no clusters "
                         "to label by: cluster with it first, in a run with train.representation_from set to it")
    if not state.get("finished"):
        raise ValueError(f"{uri} is from epoch {state['epoch'] + 1} of a run that did not finish; some methods fit "
                         "their cluster head only at the end (k-means, NMM's normalisers). Label with the run's last "
                         "checkpoint, or finish the run first (dicl train with the same train.name resumes it)")
    return state


def newest_in_run(run: str) -> str | None:
    """A run folder's newest whole checkpoint_* folder (one that holds model.pt: a run killed while writing one
    leaves it empty), or None."""
    ckpts = [c for c in storage.list_dirs(run) if c.rsplit("/", 1)[-1].startswith("checkpoint_")]
    return next((c for c in sorted(ckpts, reverse=True) if storage.exists(storage.join(c, CHECKPOINT_FILE))), None)


def resolve(uri: str) -> str:
    """A checkpoint folder, or a run folder (its newest checkpoint), as printed by the train job."""
    if not uri:
        raise ValueError("no checkpoint given: name the checkpoint or run folder printed by the train job")
    if storage.exists(storage.join(uri, CHECKPOINT_FILE)):
        return uri
    newest = newest_in_run(uri)
    if newest is None:
        raise FileNotFoundError(f"{uri} holds no {CHECKPOINT_FILE} and no checkpoint_* folder with one: run the train "
                                "job first (or finish this run: dicl train with its train.name resumes it)")
    return newest


def latest_finished(runs: str) -> str:
    """The newest checkpoint of a finished run under a runs folder (train.storage_path), by the time it was written."""
    found = [(storage.modified(storage.join(c, CHECKPOINT_FILE)), c)
             for run in storage.list_dirs(runs) if (c := newest_in_run(run)) is not None]
    for _, ckpt in sorted(found, reverse=True):
        if load(ckpt).get("finished"):
            return ckpt  # an unfinished run's newest checkpoint is skipped: it cannot label
    raise FileNotFoundError(f"no finished run under {runs}: train one first (dicl train), or set label.checkpoint "
                            "to a run or checkpoint folder")
