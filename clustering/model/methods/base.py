"""What every method shares: its settings' base, the recipe's hooks, and the model's two verbs (embed, predict)."""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ...comm import Comm
from ...schedule import Stage
from ..augment import view_for
from ..levels import pixels_to_input

class Settings(BaseModel):
    """A method's own settings (`train.method.KEY`); `name` selects the method. Unknown keys are refused."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # train.encoder values this method can build; None: it builds no encoder (the setting does not apply)
    encoders: ClassVar[tuple[str, ...] | None] = ("conv",)
    # whether the method can cluster a pretrained backbone's features (train.encoder=torchvision:NAME)
    on_features: ClassVar[bool] = True
    # train.over_cluster's default: fine clusters per cluster, merged into k on the neighbour graph at the run's end
    over_cluster: ClassVar[int] = 1
    # the least side the method's conv net trains at: a corpus of smaller images is enlarged to it (train.image_size
    # overrides)
    min_side: ClassVar[int] = 4

    @property
    def held_setting(self) -> str | None:
        """The first setting that reads rows of the held images, which streamed batches do not carry (SCAN's);
        None where none is set."""
        return None

    @property
    def agrees_across_views(self) -> bool:
        """Whether the method trains an image's views to fall in its cluster (two-view consistency): only then does
        a view that falls in another fine cluster say that cluster is of its class (the merge reads views then)."""
        return getattr(self, "consistency_weight", 0) > 0


class TrainSettings(Protocol):
    """What a recipe reads of the train config: config.py's TrainConfig, which holds the methods' settings and so
    imports this package (the methods do not import it back)."""
    k: int
    seed: int
    encoder: str
    joint_epochs: int
    representation_from: str
    method: Settings


def method_name(settings: type[Settings]) -> str:
    return settings.model_fields["name"].default


class Clusterer(nn.Module):
    """Every model: `embed(x)` gives what its `head` turns into posteriors over the clusters it learns. With
    train.over_cluster > 1 those are fine clusters, and the buffer `merge_` (each one's cluster) merges them into k."""

    head: nn.Module

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cluster_proba(self, z: torch.Tensor) -> torch.Tensor:
        """(B, k) posteriors over the clusters of codes z: the head's; or, merged, each cluster's most probable fine
        cluster's, normalised. Then an image's cluster is always its fine cluster's. A sum would not do: soft heads
        (DCEC's Student-t) spread mass over many fine clusters, and the cluster of the most would win."""
        p = self.head.predict_proba(z)
        merge = getattr(self, "merge_", None)
        if merge is None:
            return p
        best = p.new_zeros(len(p), int(merge.max()) + 1).scatter_reduce_(1, merge.expand(len(p), -1), p, "amax")
        return best / best.sum(1, keepdim=True).clamp_min(1e-12)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.cluster_proba(self.embed(x))  # (B, k)


@torch.no_grad()
def embed_all(model: nn.Module, images: torch.Tensor, batch: int = 4096, fn=None) -> torch.Tensor:
    """Codes of every local image (or `fn` of them, e.g. a net's features), in eval mode. images: uint8
    (N, C, H, W) on the model's device."""
    was_training = model.training
    model.eval()
    fn = fn or model.embed
    z = torch.cat([fn(to_float(images[i:i + batch])).float() for i in range(0, len(images), batch)])
    model.train(was_training)
    return z  # (N, D)


@torch.no_grad()
def predict_all(model: nn.Module, images: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(posteriors over the k clusters (N, k), codes (N, D)) of uint8 images (N, C, H, W) on the model's device."""
    z = embed_all(model, images, batch)
    return model.cluster_proba(z), z


@torch.no_grad()
def fine_proba(model: Clusterer, images: torch.Tensor) -> torch.Tensor:
    """(N, K) posteriors over the clusters the model learns (before any merge: `Clusterer`), as its recipe reads them."""
    return model.head.predict_proba(embed_all(model, images))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as the model's input (floats in 0..1, levels stretched: `levels.py`); features (a backbone's,
    from the cache) as they are."""
    return pixels_to_input(x) if x.dtype == torch.uint8 else x.float()


class Recipe:
    """What the engine calls; a recipe overrides the hooks it needs (the rest do nothing). `Settings` is the model
    of its own settings, read as `self.cfg.method`; the shared ones (k, epochs, seed, ...) are `self.cfg`'s."""

    Settings: ClassVar[type[Settings]]

    def __init__(self, cfg: TrainSettings, channels: int, side: int, colour: bool = True):
        """channels and side: the model's input; colour: whether that input's colour is content (`levels.colourful`),
        which picks the views (False: the gray images' views, whatever the channels)."""
        self.cfg, self.channels, self.side, self.colour = cfg, channels, side, colour
        self.view = view_for(channels, side=side, colour=colour)  # the views a clustering objective compares

    def build(self) -> Clusterer:
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        return []

    def start_stage(self, stage: Stage, model: Clusterer, images: torch.Tensor, comm: Comm) -> dict:
        return {}

    def start_epoch(self, stage: Stage, epoch: int, model: Clusterer, images: torch.Tensor, comm: Comm) -> None:
        pass

    def loss(self, stage: Stage, model: Clusterer, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """The loss of one batch x (float, (B, C, H, W) in 0..1); idx: the rows of held images (None streamed)."""
        raise NotImplementedError

    def end_epoch(self, stage: Stage, epoch: int, model: Clusterer, comm: Comm) -> dict:
        """After an epoch's steps, before its checkpoint: state learnt over the epoch goes into the model here, so
        a run resumed from that checkpoint continues exactly. Returns what the epoch's metrics should show."""
        return {}

    def finish(self, model: Clusterer, images: torch.Tensor, comm: Comm) -> dict:
        return {}

    def clusters_in(self, stage: Stage) -> bool:
        """Whether a run stopped in this stage would already cluster (after `finish`)."""
        return True

    def representation(self, model: Clusterer):
        """The function of float images giving the features the method learnt as a representation (a stage of
        its own trained them, or an earlier run's: `has_representation`), in which the label-free scores should find
        neighbours; None where it learnt none."""
        return None

    def encoder_of(self, model: Clusterer) -> nn.Module | None:
        """The part of the model that learns the representation: what freeze_representation holds and
        train.representation_from copies from an earlier run; None where the method learns none."""
        return None

    @property
    def has_representation(self) -> bool:
        """Whether the run's encoder holds a representation: learnt in its own stage, or copied from another run's."""
        return bool(getattr(self.cfg.method, "contrast_epochs", 0) or getattr(self.cfg, "representation_from", ""))


def fit_head(model: Clusterer, images: torch.Tensor, comm: Comm, seed: int) -> dict:
    """k-means on every image's code (all ranks), as the centres of the model's head."""
    model.head.fit(embed_all(model, images), comm, seed=seed)
    return {"reseeded_clusters": model.head.reseeded_}
