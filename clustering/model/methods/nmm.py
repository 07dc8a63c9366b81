"""NMM-EM (seed 002, Tissera et al.): neural mixture models trained by batch-wise EM, with two-view consistency."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from .. import losses
from .. import neighbours as nbrs
from ..augment import view_for
from ...comm import Comm
from ..encoders import Trunk, trunk
from ..heads import MixtureHead
from ...schedule import Stage, make_stages
from .base import Clusterer, Recipe, Settings, embed_all, fine_proba


class NMMSettings(Settings):
    name: Literal["nmm"] = "nmm"
    over_cluster: ClassVar = 4  # the digits at 1x..5x: ACC 0.745 -> 0.918; balanced 0.951 -> 0.946 (docs/RESULTS.md)
    encoders: ClassVar = ("conv", "resnet18")
    consistency_weight: float = Field(0.5, ge=0, description="weight of two-view consistency on the cluster "
                                      "posteriors (0 = EM alone; 0.5 the tune job's label-free pick on the digits, "
                                      "MNIST and CIFAR-10 were measured at 1)")
    instance_weight: float = Field(0.0, ge=0, description="weight of the instance-level contrastive loss (SimCLR's "
                                   "NT-Xent on a projection of the net's features); 0 = none")
    heads: int = Field(1, ge=1, description="sub-heads of k clusters trained side by side on one net; the one with "
                                           "the lowest loss labels (IIC's sub-heads)")
    over_k: int = Field(0, ge=0, description="components of an auxiliary over-clustering mixture trained alongside, "
                                            "labelling nothing (IIC); 0 = none")
    contrast_epochs: int = Field(0, ge=0, description="epochs of the instance loss alone before EM (SimCLR "
                                 "pretraining, as SCAN's first step); 0 = none")
    neighbours: int = Field(0, ge=0, description="after contrast_epochs: each image's N nearest images in the learnt "
                            "features are mined once (SCAN's 20), and its posterior should agree with a neighbour's; "
                            "0 = none. Images held in memory only (not train.input=stream)")
    neighbour_weight: float = Field(1.0, ge=0, description="weight of the agreement with a mined neighbour")
    selflabel_epochs: int = Field(0, ge=0, description="epochs of self-labelling after EM: the confident images' "
                                  "clusters train the net as labels (SCAN's last step); 0 = none")
    selflabel_threshold: float = Field(0.99, gt=0, lt=1, description="self-labelling: the posterior an image needs "
                                       "to count as confident")
    pi_momentum: float = Field(0.9, ge=0, le=1, description="how much of the old π each epoch keeps; 1 keeps π uniform, "
                               "which favours even clusters (docs/results/HISTORY.md)")
    conv_widths: tuple[int, int] = Field((32, 64), description="the conv net (encoder conv): channels of its two "
                                         "conv blocks")

    @model_validator(mode="after")
    def _neighbours_need_a_representation(self) -> "NMMSettings":
        if self.neighbours and not self.contrast_epochs:
            raise ValueError("neighbours are mined in the features that contrast_epochs learn: set contrast_epochs "
                             "(e.g. 100), or neighbours=0")
        return self


class MixtureNet(Clusterer):
    """A network whose K outputs are the mixture components, with the NMM head on them; optionally a projection
    head on the net's features for the instance loss (used in training only)."""

    def __init__(self, net: Trunk, head: MixtureHead, projection_dim: int = 0):
        super().__init__()
        self.net, self.head = net, head
        self.projector = None
        if projection_dim:  # SimCLR's MLP: the contrastive loss shapes the features through it, not directly
            f = net.feature_dim
            self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, projection_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        heads, k = self.head.log_pi_.shape
        out = self.net(x)[:, :heads * k].unflatten(1, (heads, k))  # (B, H, K): H sub-heads (then any over-clustering)
        return out[:, self.head.choice_]  # (B, K) the labelling sub-head's log-densities before normalisation

    def outputs_and_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(every sub-head's outputs (B, H*K), the projections (B, P) or None without a projector), one pass."""
        if self.projector is None:
            return self.net(x), None
        h = self.net.features(x)
        return self.net.from_features(h), self.projector(h)

    def fit_normaliser(self, images: torch.Tensor, comm: Comm) -> None:
        """Each component's normaliser over the whole data set, so that prediction needs no batch."""
        self.head.fit(embed_all(self, images), comm)


PROJECTION_DIM = 128  # SimCLR's and Contrastive Clustering's


class NMM(Recipe):
    """NMM-EM (seed 002): batch-wise EM where the forward pass is the E-step (γ, no gradient) and the
    backward pass the M-step (maximise Σ γ log π g), fused with two-view consistency.

    Our choices where the abstract is silent: g_k is output k soft-maxed over the batch; each view's
    responsibilities are the targets of the other view's M-step; consistency is SCAN's −log<p_a, p_b>
    on the posteriors; π is updated once per epoch from the corpus-wide mean responsibility.
    With instance_weight > 0 a representation loss joins them, as the paper fuses EM with representation
    learning: SimCLR's NT-Xent on a projection of the net's features (Contrastive Clustering's instance level,
    with NMM's EM in place of its cluster level).
    With heads > 1, that many sub-heads of K outputs train side by side on one net, each its own mixture,
    and the one with the lowest EM + consistency loss over the last epoch labels (IIC's sub-heads, Ji et al.
    2019): a partition that merged two classes early costs more than one that did not.
    With over_k > 0, one more mixture of over_k components trains alongside and labels nothing (IIC's
    over-clustering head): it asks the net to keep finer distinctions than K clusters need.
    With contrast_epochs > 0, a first stage ("pretrain") trains the net's features on the instance loss alone
    (SimCLR pretraining with its augmentations at full strength, SCAN's first step: the representation stage), so
    EM starts from features that already group similar images. With neighbours > 0, each image's nearest images in
    those features are mined once (over every worker, `model/neighbours.py`), and EM adds SCAN's consistency with a
    neighbour: the image's posterior should agree with the posterior a mined neighbour had at the start of the epoch
    (a target, as EM's responsibilities are). With selflabel_epochs > 0, a last stage trains on the confident
    images' clusters as labels (SCAN's self-labelling).
    """

    Settings = NMMSettings

    def __init__(self, cfg, channels: int, side: int, colour: bool = True):
        super().__init__(cfg, channels, side, colour)
        # the representation stage's views: SimCLR's in full
        self.strong_view = view_for(channels, "representation", side, self.colour)
        self.knn: torch.Tensor | None = None  # (N_local, neighbours) global ids of each held image's neighbours
        self.bank: torch.Tensor | None = None  # (N, K) every image's posterior at the start of the epoch (all ranks)
        self.own: torch.Tensor | None = None  # (N_local, K) the same for this rank's images
        self.resp_sum: torch.Tensor | None = None  # (H, K) Σ γ over this rank's batches in the current epoch
        self.head_loss_sum: torch.Tensor | None = None  # (H,) each sub-head's loss summed over those batches

    def build(self) -> MixtureNet:
        c, s = self.cfg, self.cfg.method
        net = trunk(c.encoder, self.channels, self.side, c.k * s.heads + s.over_k, s.conv_widths)
        projected = s.instance_weight or s.contrast_epochs
        return MixtureNet(net, MixtureHead(c.k, s.heads), PROJECTION_DIM if projected else 0)

    def stages(self) -> list[Stage]:
        s = self.cfg.method
        return make_stages(pretrain=s.contrast_epochs, em=self.cfg.joint_epochs, selflabel=s.selflabel_epochs)

    def clusters_in(self, stage: Stage) -> bool:
        return stage.name != "pretrain"  # before EM the mixture's outputs are untrained and their clusters say nothing

    def representation(self, model: MixtureNet):
        return model.net.features if self.cfg.method.contrast_epochs else None

    def start_epoch(self, stage, epoch, model: MixtureNet, images: torch.Tensor, comm: Comm) -> None:
        """Before an epoch that needs them: the neighbours, mined once in the features the representation stage
        learnt (again after a resume, in the features as they are then), and every image's posterior now, which
        the epoch's steps read as their targets."""
        s = self.cfg.method
        if stage.name == "pretrain" or not (s.neighbours or stage.name == "selflabel"):
            return
        if s.neighbours and self.knn is None:
            self.knn = nbrs.mine(embed_all(model, images, fn=self.representation(model)), comm, s.neighbours)
        model.fit_normaliser(images, comm)
        self.own = fine_proba(model, images)  # (N_local, K): this rank's images, for self-labelling
        self.bank = nbrs.gather_all(self.own, comm) if s.neighbours else None  # (N, K): every rank's, by global id

    def end_epoch(self, stage, epoch, model: MixtureNet, comm: Comm) -> dict:
        """π from the epoch's responsibilities, and the sub-head with the lowest loss labels."""
        if stage.name != "em":  # π and the sub-head are EM's
            return {}
        model.head.set_weights(comm.sum(self.resp_sum), self.cfg.method.pi_momentum)
        model.head.choice_.fill_(int(comm.sum(self.head_loss_sum).argmin()))
        self.resp_sum = self.head_loss_sum = None
        return self.describe_head(model)

    @staticmethod
    def describe_head(model: MixtureNet) -> dict:
        head = model.head.choice_
        return {"pi_min": float(model.head.log_pi_[head].exp().min()), "head": int(head)}

    def mixture_loss(self, logits: torch.Tensor, log_pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EM + consistency of mixtures side by side: logits (2B, H, K) of both views, log_pi (H, K).
        Returns (the loss of each (H,), the summed responsibilities (H, K))."""
        la, lb = logits.chunk(2)  # (B, H, K) each
        log_ga, log_gb = losses.batch_densities(la), losses.batch_densities(lb)
        gamma_a, gamma_b = losses.e_step(log_ga, log_pi), losses.e_step(log_gb, log_pi)
        per_head = 0.5 * (losses.m_step(gamma_b, log_ga, log_pi) + losses.m_step(gamma_a, log_gb, log_pi))  # (H,)
        weight = self.cfg.method.consistency_weight
        if weight:
            per_head = per_head + weight * losses.view_consistency(log_ga + log_pi, log_gb + log_pi)
        return per_head, (gamma_a + gamma_b).sum(0).detach()

    def neighbour_agreement(self, logits_a: torch.Tensor, log_pi: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(H,) −log Σ_k p_k(x) q_k(n) per sub-head (SCAN's consistency), where n is one of x's mined neighbours
        drawn at random and q its posterior at the start of the epoch. logits_a: (B, H, K) of one view of x."""
        pick = self.knn[idx, torch.randint(self.knn.shape[1], (len(idx),), device=idx.device)]  # global ids
        log_p = (losses.batch_densities(logits_a) + log_pi).log_softmax(-1)  # (B, H, K)
        return -(log_p.exp() * self.bank[pick][:, None]).sum(-1).clamp_min(1e-8).log().mean(0)

    def selflabel_loss(self, model: MixtureNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of a view's posterior against the cluster of each confident image (posterior above the
        threshold at the start of the epoch): SCAN's self-labelling."""
        out = model.embed(self.view(x))  # (B, K): the labelling sub-head's outputs
        log_p = (losses.batch_densities(out) + model.head.log_pi_[model.head.choice_]).log_softmax(-1)
        confidence, target = self.own[idx].max(1)
        keep = confidence > self.cfg.method.selflabel_threshold
        return F.nll_loss(log_p[keep], target[keep]) if keep.any() else log_p.sum() * 0.0

    def loss(self, stage, model: MixtureNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if stage.name == "pretrain":  # SimCLR: the instance loss alone, on projections of the net's features
            proj = model.projector(model.net.features(torch.cat([self.strong_view(x), self.strong_view(x)])))
            return losses.instance_contrast(*proj.chunk(2))
        if stage.name == "selflabel":
            return self.selflabel_loss(model, x, idx)
        views = torch.cat([self.view(x), self.view(x)])  # two views of each image, one pass (shared BN)
        logits, proj = model.outputs_and_projections(views)
        k, s = self.cfg.k, self.cfg.method
        main, over = logits[:, :s.heads * k], logits[:, s.heads * k:]
        per_head, resp = self.mixture_loss(main.unflatten(1, (-1, k)), model.head.log_pi_)
        if s.neighbours and idx is not None:  # held images: their neighbours' posteriors are in the bank
            per_head = per_head + s.neighbour_weight * self.neighbour_agreement(
                main[:len(x)].unflatten(1, (-1, k)), model.head.log_pi_, idx)
        with torch.no_grad():
            h = per_head.detach().float()
            self.resp_sum = resp if self.resp_sum is None else self.resp_sum + resp
            self.head_loss_sum = h if self.head_loss_sum is None else self.head_loss_sum + h
        loss = per_head.mean()
        if s.over_k:  # an over-clustering mixture with a fixed uniform π; it only shapes the net
            loss = loss + self.mixture_loss(over[:, None], torch.full((1, s.over_k), -math.log(s.over_k),
                                                                      device=x.device))[0].mean()
        if proj is not None:
            loss = loss + s.instance_weight * losses.instance_contrast(*proj.chunk(2))
        return loss

    def finish(self, model: MixtureNet, images: torch.Tensor, comm: Comm) -> dict:
        model.fit_normaliser(images, comm)
        return self.describe_head(model)
