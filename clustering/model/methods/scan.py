"""SCAN's steps (Van Gansbeke et al. 2020) as one block that any clustering objective composes: a representation
stage (SimCLR's instance loss alone, its views at full strength), each image's neighbours mined once in the
features it learnt (or in the pixels, without it), agreement of an image's posterior with a mined neighbour's, and
self-labelling on the confident images. The seed objectives (NMM's EM, DCEC's hardening, VC's mixture) stay the
clustering loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import losses
from .. import neighbours as nbrs
from ...comm import Comm
from ...schedule import Stage
from ..augment import view_for
from .base import Settings, embed_all

CONTRAST, SELFLABEL = "contrast", "selflabel"  # the stages this block adds before and after the method's own
PROJECTION_DIM = 128  # SimCLR's and Contrastive Clustering's


class ScanSettings(Settings):
    """The settings of SCAN's steps, shared by the methods that offer them (`train.method.KEY`)."""
    contrast_epochs: int = Field(0, ge=0, description="epochs of the instance loss alone before clustering (SimCLR "
                                 "pretraining, as SCAN's first step: the representation stage); 0 = none")
    neighbours: int = Field(0, ge=0, description="each image's N nearest images, mined once in the features that "
                            "contrast_epochs learnt (or train.representation_from copied), else in the pixels as the "
                            "model sees them (SCAN's 20): its posterior should agree with a neighbour's; 0 = none. "
                            "Images held in memory only (not train.input=stream)")
    neighbour_weight: float = Field(1.0, ge=0, description="weight of the agreement with a mined neighbour")
    selflabel_epochs: int = Field(0, ge=0, description="epochs of self-labelling after clustering: the confident "
                                  "images' clusters train the net as labels (SCAN's last step); 0 = none")
    selflabel_threshold: float = Field(0.99, gt=0, lt=1, description="self-labelling: the posterior an image needs "
                                       "to count as confident")
    freeze_representation: bool = Field(False, description="after contrast_epochs (or from train."
                                        "representation_from), the encoder that learnt the representation stops "
                                        "learning and only what reads its features trains (false: it is fine-tuned, "
                                        "as SCAN does)")

    @property
    def held_setting(self) -> str | None:
        """The first setting that reads rows of the held images (an image's neighbours, its posterior at the start of
        the epoch), which streamed batches do not carry; None where none is set."""
        return next((key for key in ("neighbours", "selflabel_epochs") if getattr(self, key)), None)


def projector(feature_dim: int) -> nn.Module:
    """SimCLR's MLP: the instance loss shapes the features through it, not directly."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                         nn.Linear(feature_dim, PROJECTION_DIM))


class Scan:
    """The state and losses of SCAN's steps for one recipe, whose clustering objective trains in its stage named
    `clustering`. `represent` is the function of float images giving the learnt features; a recipe calls `refresh`
    before each epoch that reads neighbours or confident images (`needs_refresh`)."""

    def __init__(self, settings: ScanSettings, clustering: str, channels: int, side: int, colour: bool):
        self.s, self.clustering = settings, clustering
        self.strong_view = view_for(channels, "representation", side, colour)  # SimCLR's views in full
        self.knn: torch.Tensor | None = None  # (N_local, neighbours) global ids of each held image's neighbours
        self.bank: torch.Tensor | None = None  # (N, K) every image's posterior at the start of the epoch (all ranks)
        self.own: torch.Tensor | None = None  # (N_local, K) the same for this rank's images

    def contrast_loss(self, represent, project: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """SimCLR: the instance loss on projections of two strong views' features."""
        proj = project(represent(torch.cat([self.strong_view(x), self.strong_view(x)])))
        return losses.instance_contrast(*proj.chunk(2))

    def hold(self, encoder: nn.Module, stage: Stage) -> None:
        """With freeze_representation, the encoder learns in the representation stage only. Its parameters get no
        gradient after it, which the optimizer and the gradient average skip; batch norm still normalises by batch.
        Called before each epoch, so a resumed run holds it too."""
        if self.s.freeze_representation:
            encoder.requires_grad_(stage.name == CONTRAST)

    def needs_refresh(self, stage: Stage) -> bool:
        return stage.name == SELFLABEL or (stage.name == self.clustering and bool(self.s.neighbours))

    def refresh(self, model: nn.Module, images: torch.Tensor, comm: Comm, represent, posteriors: torch.Tensor) -> None:
        """The neighbours, mined once in the learnt features (again after a resume, in the features as they are
        then), and every image's posterior now (N_local, K), which the epoch's steps read as their targets."""
        if self.s.neighbours and self.knn is None:
            space = represent or (lambda x: x.flatten(1))  # no representation stage: the pixels as the model sees them
            self.knn = nbrs.mine(embed_all(model, images, fn=space), comm, self.s.neighbours)
        self.own = posteriors
        self.bank = nbrs.gather_all(posteriors, comm) if self.s.neighbours else None

    def agreement(self, log_p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """−log Σ_k p_k(x) q_k(n), SCAN's consistency, where n is one of x's mined neighbours drawn at random and q
        its posterior at the start of the epoch. log_p: (B, K) log-posteriors of x, or (B, H, K) for H sub-heads
        (then one value per sub-head, (H,))."""
        pick = self.knn[idx, torch.randint(self.knn.shape[1], (len(idx),), device=idx.device)]  # global ids
        q = self.bank[pick].view(len(idx), *([1] * (log_p.dim() - 2)), -1)
        return -(log_p.exp() * q).sum(-1).clamp_min(1e-8).log().mean(0)

    def selflabel(self, log_p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of log-posteriors (B, K) of a view against the cluster of each confident image (posterior
        above the threshold at the start of the epoch): SCAN's self-labelling."""
        confidence, target = self.own[idx].max(1)
        keep = confidence > self.s.selflabel_threshold
        return F.nll_loss(log_p[keep], target[keep]) if keep.any() else log_p.sum() * 0.0
