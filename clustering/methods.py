"""Each method a short recipe: encoder × non-clustering loss × clustering loss × head × schedule (seed 001's taxonomy).

A recipe builds its network, names its stages, and gives the loss of one batch in each stage; the
engine (engine.py) runs it in one process or on N workers alike.
"""
from __future__ import annotations

import torch
from torch import nn

from . import losses
from .augment import digits_view
from .comm import Comm
from .config import TrainConfig
from .encoders import ConvAutoencoder, MLPAutoencoder
from .heads import StudentTHead
from .schedule import Stage, make_stages


def build_autoencoder(cfg: TrainConfig, channels: int, side: int) -> nn.Module:
    if cfg.encoder == "mlp":
        return MLPAutoencoder(channels, side, cfg.code_dim, cfg.mlp_widths)
    return ConvAutoencoder(channels, side, cfg.code_dim, cfg.conv_widths)


class ClusterNet(nn.Module):
    """An autoencoder with a clustering head on its code."""

    def __init__(self, ae: nn.Module, head: StudentTHead):
        super().__init__()
        self.ae, self.head = ae, head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(x)  # (B, D)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.predict_proba(self.embed(x))  # (B, K)


@torch.no_grad()
def embed_all(model: ClusterNet, images: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Codes of every local image, in eval mode. images: uint8 (N, C, H, W) on the model's device."""
    was_training = model.training
    model.eval()
    z = torch.cat([model.embed(to_float(images[i:i + batch])).float() for i in range(0, len(images), batch)])
    model.train(was_training)
    return z  # (N, D)


@torch.no_grad()
def predict_all(model: ClusterNet, images: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(posteriors (N, K), codes (N, D)) of uint8 images (N, C, H, W) on the model's device."""
    z = embed_all(model, images, batch)
    return model.head.predict_proba(z), z


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255.0)


class DCEC:
    """DCEC-CAH (seed 001): pretrain a conv AE on MSE; init centres by k-means on the codes; then jointly
    minimise KL(P‖Q) + λ·MSE with the hardened target P refreshed from Q over the whole dataset.
    Final labels: k-means on the final codes (as the authors)."""

    def __init__(self, cfg: TrainConfig, channels: int, side: int):
        self.cfg, self.channels, self.side = cfg, channels, side
        self.targets: torch.Tensor | None = None  # (N_local, K): P, fixed between refreshes

    def build(self) -> ClusterNet:
        c = self.cfg
        return ClusterNet(build_autoencoder(c, self.channels, self.side), StudentTHead(c.k, c.code_dim))

    def stages(self) -> list[Stage]:
        return make_stages(pretrain=self.cfg.pretrain_epochs, joint=self.cfg.joint_epochs)

    def start_stage(self, stage: Stage, model: ClusterNet, images: torch.Tensor, comm: Comm) -> dict:
        if stage.name == "joint":
            model.head.fit(embed_all(model, images), comm, seed=self.cfg.seed)
            return {"reseeded_clusters": model.head.reseeded_}
        return {}

    def start_epoch(self, stage: Stage, epoch: int, model: ClusterNet, images: torch.Tensor, comm: Comm) -> None:
        if stage.name == "joint" and (self.targets is None or (epoch - stage.start) % self.cfg.target_every == 0):
            with torch.no_grad():
                q = model.head.predict_proba(embed_all(model, images))  # (N, K)
                freq = comm.sum(q.sum(0))  # f_j over the whole corpus, not one worker's share
                self.targets = losses.cah_target(q, freq)

    def loss(self, stage: Stage, model: ClusterNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z, x_hat = model.ae(digits_view(x) if self.cfg.augment else x)
        rec = losses.reconstruction(x_hat, x)
        if stage.name == "pretrain":
            return rec
        q = model.head(z)  # (B, K)
        return losses.kl_div(self.targets[idx], q) + self.cfg.rec_weight * rec

    def finish(self, model: ClusterNet, images: torch.Tensor, comm: Comm) -> dict:
        model.head.fit(embed_all(model, images), comm, seed=self.cfg.seed)
        return {"reseeded_clusters": model.head.reseeded_}


METHODS = {"dcec": DCEC}


def build_method(cfg: TrainConfig, channels: int, side: int):
    return METHODS[cfg.method](cfg, channels, side)
