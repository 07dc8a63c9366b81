"""NMM-EM (seed 002, Tissera et al.): neural mixture models trained by batch-wise EM, with two-view consistency."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from .. import losses
from ...comm import Comm
from ..encoders import Trunk, trunk
from ..heads import MixtureHead
from ...schedule import Stage, make_stages
from .base import Clusterer, Recipe, embed_all, fine_proba
from .scan import CONTRAST, SELFLABEL, Scan, ScanSettings, projector


class NMMSettings(ScanSettings):
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
    pi_momentum: float = Field(0.9, ge=0, le=1, description="how much of the old π each epoch keeps; 1 keeps π uniform, "
                               "which favours even clusters (docs/results/HISTORY.md)")
    conv_widths: tuple[int, int] = Field((32, 64), description="the conv net (encoder conv): channels of its two "
                                         "conv blocks")


class MixtureNet(Clusterer):
    """A network whose K outputs are the mixture components, with the NMM head on them; optionally a projection
    head on the net's features for the instance loss (used in training only)."""

    def __init__(self, net: Trunk, head: MixtureHead, projected: bool = False):
        super().__init__()
        self.net, self.head = net, head
        self.projector = projector(net.feature_dim) if projected else None  # the instance loss's

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
    With contrast_epochs > 0, a first stage ("contrast") trains the net's features on the instance loss alone
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
        self.scan = Scan(cfg.method, "em", channels, side, self.colour)  # SCAN's steps: `scan.py`
        self.resp_sum: torch.Tensor | None = None  # (H, K) Σ γ over this rank's batches in the current epoch
        self.head_loss_sum: torch.Tensor | None = None  # (H,) each sub-head's loss summed over those batches

    def build(self) -> MixtureNet:
        c, s = self.cfg, self.cfg.method
        net = trunk(c.encoder, self.channels, self.side, c.k * s.heads + s.over_k, s.conv_widths)
        return MixtureNet(net, MixtureHead(c.k, s.heads), projected=bool(s.instance_weight or s.contrast_epochs))

    def stages(self) -> list[Stage]:
        s = self.cfg.method
        return make_stages(**{CONTRAST: s.contrast_epochs, "em": self.cfg.joint_epochs, SELFLABEL: s.selflabel_epochs})

    def clusters_in(self, stage: Stage) -> bool:
        return stage.name != CONTRAST  # before EM the mixture's outputs are untrained and their clusters say nothing

    def representation(self, model: MixtureNet):
        return model.net.features if self.has_representation else None

    def encoder_of(self, model: MixtureNet) -> torch.nn.Module:
        return model.net.net[:-1]  # all but the mixture's output layer

    def start_epoch(self, stage, epoch, model: MixtureNet, images: torch.Tensor, comm: Comm) -> None:
        """Before an epoch that needs them: the neighbours, mined once in the features the representation stage
        learnt (again after a resume, in the features as they are then), and every image's posterior now, which
        the epoch's steps read as their targets."""
        self.scan.hold(self.encoder_of(model), stage)
        if self.scan.needs_refresh(stage):
            model.fit_normaliser(images, comm)
            self.scan.refresh(model, images, comm, self.representation(model), fine_proba(model, images))

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

    def log_posteriors(self, logits: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
        """log p(k | x) of a batch's outputs (B, [H,] K) under the mixture's weights log_pi ([H,] K)."""
        return (losses.batch_densities(logits) + log_pi).log_softmax(-1)

    def loss(self, stage, model: MixtureNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if stage.name == CONTRAST:  # SimCLR: the instance loss alone, on projections of the net's features
            return self.scan.contrast_loss(model.net.features, model.projector, x)
        if stage.name == SELFLABEL:  # the labelling sub-head's posteriors of a view, on the confident images' clusters
            head = model.head.choice_
            return self.scan.selflabel(self.log_posteriors(model.embed(self.view(x)), model.head.log_pi_[head]), idx)
        views = torch.cat([self.view(x), self.view(x)])  # two views of each image, one pass (shared BN)
        logits, proj = model.outputs_and_projections(views)
        k, s = self.cfg.k, self.cfg.method
        main, over = logits[:, :s.heads * k], logits[:, s.heads * k:]
        per_head, resp = self.mixture_loss(main.unflatten(1, (-1, k)), model.head.log_pi_)
        if s.neighbours and idx is not None:  # held images: their neighbours' posteriors are in the bank
            log_p = self.log_posteriors(main[:len(x)].unflatten(1, (-1, k)), model.head.log_pi_)  # one view's
            per_head = per_head + s.neighbour_weight * self.scan.agreement(log_p, idx)
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
