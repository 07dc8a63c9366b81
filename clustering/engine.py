"""The training loop of one process, alone or as one rank of N (through `Comm`); no Ray here.

Data comes through one seam (`inputs.py`): the rank's images held on the device or streamed from its shards.
Either way every rank runs the same number of steps per epoch (sized from the global sample count), so no rank
waits forever on a collective, and dataset-level statistics read the input's `sample`.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .model.augment import view_for
from .model.levels import colourful
from .model.deskew import deskew
from .model.backbones import Backbone, WithBackbone, is_backbone, is_features, load_pretrained, pretrained
from . import checkpoints
from .comm import Comm
from .config import TrainConfig
from .data.inputs import MemoryInput, TrainInput, as_input, device_images  # noqa: F401 (device_images: part of the engine's API)
from .model.methods import build_method, embed_all, fine_proba, predict_all, to_float
from .metrics import LabelFreeScores, evenness, merge_by_modularity, sample_index
from .schedule import Stage, stage_at, steps_per_epoch

EpochCallback = Callable[[int, dict, Callable[[], dict]], None]


class NonFiniteLoss(FloatingPointError):
    pass


class Diverged(NonFiniteLoss):
    """A run whose loss grew by orders of magnitude, or that put every image in one of k > 1 clusters: the model
    is unusable, and the message says what to change."""


DIVERGED_GROWTH = 100.0  # a stage's loss this many times its first epoch's scale above it: diverged


def check_diverged(history: list[dict]) -> None:
    """Raise Diverged when the last epoch's loss rose far above its stage's first epoch's (losses that learn
    shrink, or grow by a small factor at most: a KL toward a sharpening target)."""
    last = history[-1]
    first = next(m for m in history if m["stage"] == last["stage"])
    if last["loss"] - first["loss"] > DIVERGED_GROWTH * max(abs(first["loss"]), 1.0):
        raise Diverged(f"the run diverged: its {last['stage']} loss grew from {first['loss']:.4g} in epoch "
                       f"{first['epoch'] + 1} to {last['loss']:.4g} in epoch {last['epoch'] + 1}; the last good "
                       "checkpoint is kept. Lower train.lr (e.g. by 10x) and train again under a new train.name.")


def check_collapsed(model: torch.nn.Module, images: torch.Tensor, k: int, comm: Comm, most: int = 10_000) -> None:
    """Raise Diverged (on every rank alike) when a model of k > 1 clusters puts every image of the ranks' samples
    (up to `most` each) in one cluster."""
    clusters = predict_all(model, images[:most])[0].argmax(1)
    sizes = comm.sum(torch.bincount(clusters, minlength=k).float())
    n = int(sizes.sum().item())
    if k > 1 and n >= 2 * k and int((sizes > 0).sum().item()) == 1:
        raise Diverged(f"the run collapsed: all {n:,} sampled images fall in one of its {k} clusters, so "
                       "its labels would say nothing. Lower train.lr (e.g. by 10x) and train again under a new "
                       "train.name.")


def model_spec(cfg: TrainConfig, channels: int, side: int, colour: bool = True) -> dict:
    """What a checkpoint needs to rebuild its model: the config and the input (channels, side, and whether its
    colour is content, `levels.colourful`, which chose the views)."""
    return {"method": cfg.method.name, "channels": channels, "side": side, "colour": colour,
            "config": cfg.model_dump(mode="json")}


def build_from_spec(spec: dict):
    """(method, model) from the spec stored in a checkpoint, with random weights. With a pretrained backbone the
    method works on its features (D channels, side 1) and the model is a `WithBackbone`."""
    cfg = TrainConfig.of_spec(spec["config"])
    if not is_backbone(cfg.encoder):
        method = build_method(cfg, spec["channels"], spec["side"], spec.get("colour", True))
        return method, with_merge(method.build(), cfg)
    backbone = Backbone(cfg.encoder, cfg.backbone_size)
    method = build_method(cfg, backbone.out_dim, 1)
    return method, WithBackbone(backbone, with_merge(method.build(), cfg))


def with_merge(model, cfg: TrainConfig):
    """The model; where it learns fine clusters (train.over_cluster), with its map `merge_` of them into k, which
    `merge_fine_clusters` sets at the end of the run (until then fine cluster i counts as cluster i mod k)."""
    if cfg.fine_k > cfg.k:
        model.register_buffer("merge_", torch.arange(cfg.fine_k) % cfg.k)
    return model


def trainee(model: torch.nn.Module) -> torch.nn.Module:
    """What a method's hooks train and read: the model, or a `WithBackbone`'s model on the features."""
    return model.inner if isinstance(model, WithBackbone) else model


def features_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a method's hooks read of held inputs x: x, or a backbone's features of them (features pass as they are)."""
    if not isinstance(model, WithBackbone) or is_features(x):
        return x
    return embed_all(model, x, fn=model.features)


def method_on(model: torch.nn.Module, cfg: TrainConfig, x: torch.Tensor):
    """(the method's recipe, the model its hooks read, x as they read it) for a model and held inputs x."""
    x = features_of(model, x)
    return build_method(cfg, x.shape[1], x.shape[-1]), trainee(model), x


def model_copy(state: dict, device: torch.device | str):
    """(method, model in eval mode) of a run's checkpoint dict (`on_epoch`'s state_fn()), to look at it mid-run.
    Building the copy draws random weights: the run's random stream is left as it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        method, model = build_from_spec(state["spec"])
    model.to(device).load_state_dict(state["model"])
    return method, model.eval()


def model_now(state: dict, x: torch.Tensor, comm: Comm = Comm()):
    """A copy of the model of the run of `state` as it would label if the run ended there: after the method's
    end-of-run step (k-means on the codes, NMM's normalisers) on the images x (on the device)."""
    _, model = model_copy(state, x.device)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        end_of_run(model, TrainConfig.of_spec(state["spec"]["config"]), x, comm)
    return model


def end_of_run(model, cfg: TrainConfig, x: torch.Tensor, comm: Comm) -> dict:
    """The method's end-of-run step (k-means on the codes, NMM's normalisers) on the held images x, then the merge
    of its fine clusters into k (train.over_cluster). Returns what the run's last metrics should show."""
    method, inner, features = method_on(model, cfg, x)
    final = method.finish(inner, features, comm)
    if cfg.fine_k > cfg.k:
        final = {**final, "fine_clusters": merge_fine_clusters(model, cfg, x, comm)}
    return final


def clusters_now(state: dict, x: torch.Tensor, comm: Comm = Comm()) -> torch.Tensor:
    """(N,) the clusters of the images x that the run of `state` would give if it ended there (`model_now`)."""
    return predict_all(model_now(state, x, comm), x)[0].argmax(1)


def representation_of(cfg: TrainConfig, model, x: torch.Tensor) -> np.ndarray | None:
    """(N, D) the features the model learnt as a representation (a stage of its own trained them, or a fine-tuned
    backbone) of the uint8 images x on the model's device, where the label-free scores should find neighbours; None
    where it learnt none (or x are already a frozen backbone's features, which the caller scores on)."""
    fn = build_method(cfg, 1, 8).representation(trainee(model))  # stages and features do not depend on the shape
    if fn is not None:
        return embed_all(trainee(model), features_of(model, x), fn=fn).cpu().numpy()
    if isinstance(model, WithBackbone) and not is_features(x):  # a fine-tuned backbone's run: its features now
        return features_of(model, x).flatten(1).cpu().numpy()
    return None


def views_of(x: torch.Tensor, seed: int = 0, batch: int = 4096) -> torch.Tensor:
    """One random view of each uint8 image (N, C, H, W), uint8 again: the methods' augmentation (`view_for`) drawn
    from a fixed seed, so every run is shown the same views (the ground on which `metrics.stability` compares
    runs). The run's random stream is left as it was."""
    pixels = x.dtype == torch.uint8  # else features (side 1): views stay floats
    view = view_for(x.shape[1], side=x.shape[-1], colour=pixels and colourful(x))
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        out = [view(to_float(x[i:i + batch])) for i in range(0, len(x), batch)]
        out = [v.mul_(255).round_().to(torch.uint8) for v in out] if pixels else out
    return torch.cat(out) if out else x.clone()


def while_clustering(cfg: TrainConfig, every: int, fn: Callable[[int, dict], None]) -> EpochCallback:
    """An on_epoch callback that calls fn(epochs done, the run's checkpoint dict) every `every` epochs of the stages
    in which the method clusters (`clusters_in`), up to the last epoch: the finished model is the caller's."""
    method = build_method(cfg, 1, 8)  # stages do not depend on the images' shape
    stages = method.stages()

    def on_epoch(epoch: int, info: dict, state_fn) -> None:
        if info["stage"] != "final" and (epoch + 1) % every == 0 and method.clusters_in(stage_at(stages, epoch)):
            fn(epoch + 1, state_fn())
    return on_epoch


def total_epochs(cfg: TrainConfig) -> int:
    """Epochs of a whole run (stages do not depend on the images' shape)."""
    stages = build_method(cfg, 1, 8).stages()
    return stages[-1].end if stages else 0


@dataclass
class Run:
    """What a run trains and keeps: its model, optimizer and history; `state` is its checkpoint dict."""
    spec: dict
    method: object
    model: torch.nn.Module
    opt: torch.optim.Optimizer | None
    history: list = field(default_factory=list)
    resumed_from: int = -1  # the last epoch of the checkpoint this process resumed from (-1: none)
    pending: dict = field(default_factory=dict)  # for the next epoch's metrics: the pick among starts
    ddp: torch.nn.Module | None = None  # a fine-tuned backbone wrapped in DDP (`use_ddp`), over N workers

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A training batch as the method's hooks read it: images through the backbone (DDP's, when it averages the
        backbone's gradients), or as they are."""
        if self.ddp is not None and not is_features(x):
            return self.ddp(x)[:, :, None, None]
        return self.model.features(x) if isinstance(self.model, WithBackbone) else x

    def average_gradients(self, comm: Comm) -> None:
        """The flat all-reduce over what DDP does not already average (all of it without DDP)."""
        comm.average_gradients(self.model.inner if self.ddp is not None else self.model)

    def state(self, epoch: int, finished: bool = False) -> dict:
        # finished: the method's end-of-run step (k-means, NMM's normalisers) is in the weights; labelling needs it
        return {"spec": self.spec, "model": self.model.state_dict(), "optimizer": self.opt.state_dict() if self.opt else {},
                "epoch": epoch, "rng": torch.get_rng_state(), "history": self.history, "finished": finished}

    def record(self, metrics: dict) -> dict:
        """An epoch's metrics, with what the run has to say once, into its history."""
        metrics = {**self.pending, **metrics, "resumed_from": self.resumed_from}
        self.pending = {}
        self.history.append(metrics)
        return metrics


def new_run(cfg: TrainConfig, channels: int, side: int, device: torch.device, colour: bool = True) -> Run:
    """A run from scratch on images of (channels, side): a pretrained backbone with its weights, the rest random."""
    spec = model_spec(cfg, channels, side, colour)
    torch.manual_seed(cfg.seed)  # the same seed on every rank gives every rank the same initial weights
    method, model = build_from_spec(spec)
    if isinstance(model, WithBackbone):  # the backbone build_from_spec made, with its pretrained weights
        load_pretrained(model.backbone, cfg.weights)
        model.backbone.requires_grad_(cfg.backbone_lr > 0)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return Run(spec, method, model, optimizer(model, cfg))


def optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """Adam at train.lr; a fine-tuned backbone's weights at train.backbone_lr. None: nothing to train (k-means)."""
    groups = [{"params": [p for p in trainee(model).parameters() if p.requires_grad], "lr": cfg.lr}]
    if isinstance(model, WithBackbone) and cfg.backbone_lr > 0:
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.backbone_lr})
    groups = [g for g in groups if g["params"]]
    return torch.optim.Adam(groups) if groups else None


def use_ddp(run: Run, cfg: TrainConfig, comm: Comm) -> None:
    """Over N workers, a fine-tuned backbone averages its gradients with PyTorch DDP: bucketed all-reduces that
    overlap the backward pass (train.gradients=ddp). The small net on its features keeps the flat all-reduce."""
    import torch.distributed as dist

    if (isinstance(run.model, WithBackbone) and cfg.backbone_lr > 0 and cfg.gradients == "ddp" and comm.world > 1
            and dist.is_available() and dist.is_initialized()):
        ddp = torch.nn.parallel.DistributedDataParallel
        # The backbone's buffers (batch-norm statistics, in eval mode) never change: no syncing at each forward.
        # torch >= 2.13 names that forward_sync_buffers; broadcast_buffers before.
        quiet = "forward_sync_buffers" in inspect.signature(ddp).parameters
        run.ddp = ddp(run.model.backbone, **{"forward_sync_buffers" if quiet else "broadcast_buffers": False})


def restore(run: Run, resume: dict, cfg: TrainConfig, log: Callable[[str], None], picked: bool) -> int:
    """Load a checkpoint dict into the run; returns the first epoch to train. `picked`: it is a start's (no note)."""
    run.model.load_state_dict(resume["model"])
    if run.opt is not None:
        run.opt.load_state_dict(resume["optimizer"])
    torch.set_rng_state(resume["rng"])
    run.history = list(resume.get("history", []))
    if not picked:
        log(f"resumed from epoch {resume['epoch']}")
        kept_lr = run.opt.param_groups[0]["lr"] if run.opt is not None else cfg.lr
        if kept_lr != cfg.lr:  # a resumed run continues its optimizer as it was, learning rate included
            log(f"note: the run continues with its checkpoint's lr {kept_lr:g}; train.lr={cfg.lr:g} applies to new runs "
                "(give train.name a new value to start one)")
    return int(resume["epoch"]) + 1


def train_epoch(run: Run, data: TrainInput, stage: Stage, epoch: int, cfg: TrainConfig, comm: Comm,
                steps: int) -> dict:
    """One epoch of `steps` steps on every rank; returns its metrics (the same on every rank)."""
    method, model, opt, device = run.method, trainee(run.model), run.opt, data.sample.device
    t0 = time.perf_counter()
    sample = features_of(run.model, data.sample)  # a fine-tuned backbone's features of the held images, this epoch
    events = method.start_stage(stage, model, sample, comm) if epoch == stage.start else {}
    method.start_epoch(stage, epoch, model, sample, comm)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum, bad = torch.zeros((), device=device), torch.zeros((), device=device)
    for x_u8, idx in data.batches(epoch, steps, max(1, cfg.batch_size // comm.world), cfg.seed, comm.rank):
        with autocast:
            loss = method.loss(stage, model, run.features(to_float(x_u8)), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        run.average_gradients(comm)
        opt.step()
        loss_sum += loss.detach().float()
        bad += (~torch.isfinite(loss.detach())).float()
    events = {**events, **method.end_epoch(stage, epoch, model, comm)}
    # One collective per epoch: every rank sees the same sums, so all stop together on a NaN.
    totals = comm.sum(torch.stack([loss_sum, bad]))
    rank_steps = comm.gather(torch.tensor([[float(steps)]], device=device), 1)  # (world, 1): steps of each rank
    if totals[1].item() > 0:
        raise NonFiniteLoss(f"{stage.name} loss became NaN/inf in epoch {epoch} ({int(totals[1].item())} steps); "
                            "the last good checkpoint is kept. Lower train.lr or check the input data.")
    return {"epoch": epoch, "stage": stage.name, "loss": totals[0].item() / (steps * comm.world),
            "seconds": time.perf_counter() - t0, "steps_min": int(rank_steps.min()), "steps_max": int(rank_steps.max()),
            "local_samples": data.n, "input": "stream" if data.streamed else "memory", **events}


def start_run(data: TrainInput, cfg: TrainConfig, comm: Comm, device: torch.device, resume: dict | None,
              log: Callable[[str], None]) -> tuple[Run, int]:
    """(the run, its first epoch): new, continued from `resume`, or, with cfg.restarts > 1 and nothing to resume,
    the best of that many starts (`best_start`)."""
    picked = resume is None and cfg.restarts > 1
    if picked:
        resume = best_start(data, cfg, comm, device, log)
    run = new_run(cfg, *data.image_shape, device, colourful(data.sample, comm))
    if resume is None:
        if cfg.representation_from:
            start_from_representation(run, cfg, log)
        return run, 0
    start = restore(run, resume, cfg, log, picked)
    if picked:  # the pick shows in the metrics of the first epoch after it (and in the checkpoints' history)
        run.pending = {key: resume["history"][-1][key]
                       for key in ("start_modularity", "start_evenness", "start_picked")}
    else:
        run.resumed_from = start - 1
    return run, start


def start_from_representation(run: Run, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """train.representation_from: the encoder of an earlier run's checkpoint, copied into this new run's."""
    source = checkpoints.load_any(cfg.representation_from)
    theirs, ours = (tuple(spec[key] for key in ("method", "channels", "side")) for spec in (source["spec"], run.spec))
    if theirs != ours:
        raise ValueError(f"train.representation_from={cfg.representation_from} is a {theirs[0]} run on images of "
                         f"{theirs[1]} channels and side {theirs[2]}; this run is {ours[0]} on {ours[1]} channels "
                         f"and side {ours[2]}: start from a run of the same method on the same input (train.image_size "
                         "sets the side)")
    method, model = model_copy(source, "cpu")
    try:
        run.method.encoder_of(trainee(run.model)).load_state_dict(method.encoder_of(trainee(model)).state_dict())
    except RuntimeError as e:
        why = str(e).splitlines()[-1].strip()  # the first weight of another shape
        raise ValueError(f"train.representation_from={cfg.representation_from}: its encoder does not fit this run's "
                         f"(train.encoder and the method's widths must be the same): {why}") from None
    log(f"starting from the representation of {cfg.representation_from} (after its epoch {source['epoch'] + 1})")


def finish_run(run: Run, data: TrainInput, comm: Comm, total: int, on_epoch: EpochCallback | None) -> None:
    """The method's end-of-run step (k-means on the codes, NMM's normalisers), then the finished checkpoint. A run
    of the representation stage alone has no clusters to fit: its checkpoint says so, and serves as another run's
    train.representation_from."""
    cfg = TrainConfig.of_spec(run.spec["config"])
    stages = run.method.stages()  # none: k-means, which clusters in its end-of-run step alone
    clusters = not stages or any(run.method.clusters_in(stage) for stage in stages)
    alone = {} if clusters else {"representation_only": True}  # in its last metrics and its checkpoint
    final = alone
    if clusters:
        final = end_of_run(run.model, cfg, data.sample, comm)
        check_collapsed(run.model.eval(), features_of(run.model, data.sample), cfg.k, comm)
    if on_epoch is not None:
        metrics = {**(run.history[-1] if run.history else {}), "epoch": total - 1, "stage": "final",
                   "resumed_from": run.resumed_from, **final}
        on_epoch(total - 1, metrics, lambda: {**run.state(total - 1, finished=True), **alone})


def on_features(data: TrainInput, cfg: TrainConfig) -> TrainInput:
    """A frozen backbone's run trains on features: those of the cache already, else computed here once from images
    held in memory (the Python API's path; the jobs read the cache)."""
    if not cfg.frozen_backbone or is_features(data.sample):
        return data
    if data.streamed:
        raise ValueError(f"train.encoder={cfg.encoder} is frozen (train.backbone_lr=0) and its images stream: compute "
                         "their features once with `dicl features`, and train on that cache")
    backbone = pretrained(cfg.encoder, cfg.backbone_size, cfg.weights).to(data.sample.device).eval()
    feats = embed_all(backbone, data.sample, fn=backbone)
    return MemoryInput.of_features(feats.cpu().numpy(), data.image_shape, data.sample.device, data.sample_labels)


def check_held(data: TrainInput, cfg: TrainConfig) -> None:
    """SCAN's neighbours and self-labelling read rows of the held images: a streamed run is refused before training,
    not at its last stage."""
    key = cfg.method.held_setting
    if data.streamed and key:
        raise ValueError(f"train.method.{key}={getattr(cfg.method, key)} needs the images held in memory, and this "
                         f"run streams them (train.input={cfg.input}): set train.input=memory (raising "
                         f"train.memory_budget_gb where auto chose the stream), or train.method.{key}=0")


def fit(data: TrainInput | np.ndarray, cfg: TrainConfig, comm: Comm = Comm(), device: torch.device | str = "cpu",
        resume: dict | None = None, on_epoch: EpochCallback | None = None, log: Callable[[str], None] = print,
        until: int | None = None):
    """Train `cfg.method` on an input (`inputs.py`), or on uint8 images (N, H, W, C) held in memory. Returns the
    model (in eval mode).

    on_epoch(epoch, metrics, state_fn) runs after each epoch on every rank; state_fn() gives a checkpoint dict
    (model, optimizer, epoch, RNG) for the caller to persist. `resume` is such a dict: training continues after
    its epoch. `until`: stop after that many epochs, before the method's end-of-run step (a start being tried).
    """
    device = torch.device(device)
    data = on_features(as_input(data, device), cfg)
    check_held(data, cfg)
    if data.n == 0:
        raise ValueError(f"rank {comm.rank} has no samples: use at least as many shards as workers")
    run, start = start_run(data, cfg, comm, device, resume, log)
    use_ddp(run, cfg, comm)
    stages = run.method.stages()
    total = stages[-1].end if stages else 0
    end = total if until is None else min(until, total)
    # Every rank steps the same number of times, sized from the global count: no rank waits on a collective.
    steps = steps_per_epoch(int(comm.sum(torch.tensor([float(data.n)], device=device)).item()), cfg.batch_size)
    run.model.train()
    try:
        for epoch in range(start, end):
            metrics = run.record(train_epoch(run, data, stage_at(stages, epoch), epoch, cfg, comm, steps))
            check_diverged(run.history)
            log(f"epoch {epoch + 1}/{total} [{metrics['stage']}] loss {metrics['loss']:.5f} ({metrics['seconds']:.1f}s)")
            if on_epoch is not None and epoch < total - 1:
                on_epoch(epoch, metrics, lambda e=epoch: run.state(e))
    finally:
        data.close()
    if end == total:
        finish_run(run, data, comm, total, on_epoch)
    run.model.eval()
    return run.model


RESTART_SEED_STRIDE = 1000  # start r of seed s uses seed s + 1000·r: start 0 is the run restarts=1 would train


def cluster_evenness(model, images: torch.Tensor, comm: Comm, k: int) -> float:
    """`metrics.evenness` of the model's cluster sizes over every rank's images."""
    pred = predict_all(model, images)[0].argmax(1)
    return evenness(comm.sum(torch.bincount(pred, minlength=k).float()).cpu().numpy())


RESTART_SAMPLE = 5_000  # images, over every rank, on whose neighbour graph each start is scored


def start_modularity(model, cfg: TrainConfig, x: torch.Tensor, comm: Comm, most: int = RESTART_SAMPLE) -> float:
    """`LabelFreeScores.modularity` of a start's clusters on the neighbour graph of a seeded sample of the images x,
    gathered from every rank (`graph_sample`), as the tune job scores a trial. Every rank scores alike."""
    scores, clusters = graph_sample(model, cfg, x, comm, most, lambda local: predict_all(model, local)[0].argmax(1))
    return scores.modularity(clusters[:, 0])


MERGE_SAMPLE = 10_000  # images, over every rank, on whose neighbour graph fine clusters are merged
MERGE_VIEWS = 8  # random views of each sampled image whose fine clusters link it to others (`merge_by_modularity`)
MERGE_VIEW_LINKS = 4.0  # links in all that an image's views add beside its pixel links (docs/results/HISTORY.md)


def merge_fine_clusters(model, cfg: TrainConfig, x: torch.Tensor, comm: Comm, most: int = MERGE_SAMPLE) -> int:
    """Set the model's map of its cfg.fine_k fine clusters into cfg.k (`metrics.merge_by_modularity`) on the
    neighbour graph of a seeded sample of the images x over every rank, with the fine clusters of views of each
    (`merge_sample`). Every rank gathers the same rows and sets the same map. Returns how many fine clusters hold a
    sampled image."""
    return set_merge(model, cfg, *merge_sample(model, cfg, x, comm, most))


def set_merge(model, cfg: TrainConfig, scores: LabelFreeScores, fine: np.ndarray) -> int:
    """Set the model's map of its fine clusters into cfg.k from a `merge_sample`; returns how many fine clusters hold
    a sampled image."""
    merge = merge_by_modularity(scores.graph(), fine[:, 0], cfg.fine_k, cfg.k, views=fine[:, 1:],
                                view_links=MERGE_VIEW_LINKS)
    trainee(model).merge_.copy_(torch.from_numpy(merge))
    return len(np.unique(fine[:, 0]))


def merge_sample(model, cfg: TrainConfig, x: torch.Tensor, comm: Comm, most: int = MERGE_SAMPLE
                 ) -> tuple[LabelFreeScores, np.ndarray]:
    """(the scores of a seeded sample of the images x over every rank (`graph_sample`), (S, 1 + V) the fine cluster
    of each sampled image, then of each of its V seeded views (`views_of`)): MERGE_VIEWS views where the method
    trains an image's views to agree, else none. Rows in the order of the scores' graph."""
    inner = trainee(model)
    views = MERGE_VIEWS if cfg.method.agrees_across_views else 0

    def fine_clusters(local: torch.Tensor) -> torch.Tensor:
        seen = [local] + [views_of(local, seed=r) for r in range(views)]
        return torch.stack([fine_proba(inner, features_of(model, v)).argmax(1) for v in seen], 1)
    scores, fine = graph_sample(model, cfg, x, comm, most, fine_clusters)
    return scores, fine[scores.index]


def graph_sample(model, cfg: TrainConfig, x: torch.Tensor, comm: Comm, most: int,
                 assign: Callable[[torch.Tensor], torch.Tensor]) -> tuple[LabelFreeScores, np.ndarray]:
    """(the scores of a seeded sample of up to `most` images x over every rank, (S, C) the cluster ids that `assign`
    gives each sampled image from the local ones) for the label-free rules on the neighbour graph: in the
    representation where the model learnt one, else in pixels as the model sees them (or a frozen backbone's
    features). Every rank gathers the same rows."""
    per_rank = max(1, most // comm.world)
    local = x[torch.from_numpy(sample_index(len(x), per_rank, seed=comm.rank)).to(x.device)]
    clusters = assign(local).reshape(len(local), -1)
    learnt = representation_of(cfg, model, local)
    if learnt is not None:
        points = torch.from_numpy(learnt).to(x.device)
    else:  # pixels as the model sees them (levels stretched: a tinted capture links to its clean look-alikes)
        points = (to_float(local) * 255).round() if local.dtype == torch.uint8 else local
        if cfg.deskew and local.dtype == torch.uint8:  # handwriting: its slant and position are no distance
            points = deskew(points).round()
    c = clusters.shape[1]
    rows = comm.gather(torch.cat([points.flatten(1).float(), clusters.float()], 1), per_rank).cpu().numpy()
    points, clusters = rows[:, :-c], rows[:, -c:].astype(np.int64)
    if learnt is None and x.dtype == torch.uint8:
        points = points.astype(np.uint8)  # pixels, which the scores read as such
    return LabelFreeScores(points, sample=len(points)), clusters


def check_restarts(cfg: TrainConfig) -> None:
    """A start must train fewer epochs than the whole run, and must end where the run clusters (for NMM after its
    contrastive pretraining): before that, its cluster sizes say nothing."""
    if cfg.restarts > 1:
        method = build_method(cfg, 1, 8)
        total = total_epochs(cfg)
        if cfg.restart_epochs >= total:
            raise ValueError(f"train.restart_epochs={cfg.restart_epochs} must be fewer than the run's {total} epochs: "
                             "lower it, or set train.restarts=1")
        stage = stage_at(method.stages(), cfg.restart_epochs - 1)
        if not method.clusters_in(stage):
            raise ValueError(f"train.restart_epochs={cfg.restart_epochs} ends in the run's {stage.name} stage, before "
                             f"{cfg.method.name} clusters (it ends at epoch {stage.end}): raise it, or set "
                             "train.restarts=1")


def start_config(cfg: TrainConfig, r: int) -> TrainConfig:
    return cfg.model_copy(update={"seed": cfg.seed + RESTART_SEED_STRIDE * r, "restarts": 1})


def try_start(data: TrainInput, start: TrainConfig, epochs: int, comm: Comm, device):
    """Train `start` for `epochs` epochs. Returns (its checkpoint then, the model labelling as a finished run
    would: after the method's end-of-run step, e.g. k-means or NMM's normalisers, on the input's sample)."""
    kept: dict = {}

    def keep(epoch: int, metrics: dict, state_fn) -> None:
        if epoch == epochs - 1:
            kept.update(copy.deepcopy(state_fn()))

    model = fit(data, start, comm, device, on_epoch=keep, log=lambda s: None, until=epochs)
    end_of_run(model, start, data.sample, comm)
    return kept, model


def best_start(data: TrainInput | np.ndarray, cfg: TrainConfig, comm: Comm, device, log: Callable[[str], None]) -> dict:
    """Train cfg.restarts starts for cfg.restart_epochs epochs each; return the checkpoint of the one with the highest
    modularity on the images' neighbour graph (`start_modularity`) times evenness of its cluster sizes. No labels: a
    start that merges two classes early and splits another has a loss no higher than a good start's
    (docs/results/HISTORY.md), but its split cuts the neighbours' links. Evenness alone, the rule before, mistook a
    collection's unequal classes for such a merge; as a factor it only settles near-ties of modularity, which
    varies far more between starts (benchmarks/starts.py, docs/RESULTS.md). Every rank trains the same starts and
    scores the same rows, so all pick the same one."""
    check_restarts(cfg)
    data = as_input(data, device)
    best, picked, scores, modularity, even = None, 0, [], [], []  # each start's score, and its two factors
    for r in range(cfg.restarts):
        start = start_config(cfg, r)
        kept, model = try_start(data, start, cfg.restart_epochs, comm, device)
        modularity.append(start_modularity(model, start, data.sample, comm))
        even.append(cluster_evenness(model, data.sample, comm, cfg.k))
        score = modularity[-1] * even[-1]
        log(f"start {r + 1}/{cfg.restarts} (seed {start.seed}): {cfg.restart_epochs} epochs, loss "
            f"{kept['history'][-1]['loss']:.5f}, modularity {modularity[-1]:.4f} x cluster evenness {even[-1]:.4f}")
        if best is None or score > max(scores):
            best, picked = kept, r
        scores.append(score)
    best["history"][-1] = {**best["history"][-1], "start_modularity": [round(m, 4) for m in modularity],
                           "start_evenness": [round(e, 4) for e in even], "start_picked": picked}
    log(f"continuing start {picked + 1} (the highest modularity x evenness)")
    return best
