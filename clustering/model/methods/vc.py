"""VC, Variational Clustering (seed 000, Prasad et al.): a VAE whose prior is a learned Gaussian mixture."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from .. import losses
from ..encoders import ConvAutoencoder, ConvNet
from ..heads import SoftmaxHead
from ...schedule import Stage, make_stages
from .base import Clusterer, Recipe, fine_proba
from .scan import CONTRAST, SELFLABEL, Scan, ScanSettings, projector


class VCSettings(ScanSettings):
    name: Literal["vc"] = "vc"
    on_features: ClassVar = False  # its Bernoulli decoder models pixels in 0..1
    over_cluster: ClassVar = 4  # the digits at 1x..5x: ACC 0.780 -> 0.832; balanced 0.795 -> 0.880 (docs/RESULTS.md)
    consistency_weight: float = Field(1.0, ge=0, description="weight of two-view consistency on q(y|x) (0 = the "
                                      "ELBO and balance term on the images alone)")
    balance_weight: float = Field(1.5, ge=0, description="weight of KL(mean q(y|x) ‖ p(y)); 0 = plain ELBO")
    code_dim: int = Field(16, ge=2, description="size of the continuous latent z")
    conv_widths: tuple[int, int] = Field((32, 64), description="the encoder's conv net: channels of its two blocks")
    ae_widths: tuple[int, ...] = Field((32, 64, 128), min_length=1,
                                       description="the decoder: stride-2 conv channels (DCEC's conv autoencoder)")
    decoded: int = Field(10, ge=1, description="the ELBO decodes each image under the N clusters most likely by "
                         "q(y|x), all where k ≤ N; each other cluster counts at the worst of those reconstructions")


class VCNet(Clusterer):
    """Gaussian-mixture VAE (seed 000): q(y|x) categorical, q(z|x,y) Gaussian (the encoder sees x and y),
    p(z|y) = N(μ_y, σ_y²) learned, p(y) uniform, p(x|z) a Bernoulli conv decoder."""

    def __init__(self, channels: int, side: int, k: int, code_dim: int, widths: tuple[int, int],
                 decoder_widths: tuple[int, ...], hidden: int = 256, projected: bool = False):
        super().__init__()
        self.k = k
        self.trunk = ConvNet(channels, side, hidden, widths)  # x -> features
        self.to_y = nn.Linear(hidden, k)
        self.to_z = nn.Linear(hidden + k, 2 * code_dim)
        self.prior_mu = nn.Parameter(torch.randn(k, code_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(k, code_dim))
        self.decoder = ConvAutoencoder(channels, side, code_dim, decoder_widths).decoder
        self.head = SoftmaxHead()
        self.projector = projector(hidden) if projected else None  # a representation stage's instance loss

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.trunk(x))  # (B, H)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_y(self.features(x))  # (B, K) logits of q(y|x)

    def posterior_z(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(z|x,y) for every y: (μ, log σ², one sample z), each (B, K, D)."""
        onehot = torch.eye(self.k, device=h.device).expand(len(h), -1, -1)  # (B, K, K)
        mu, logvar = self.to_z(torch.cat([h[:, None].expand(-1, self.k, -1), onehot], -1)).chunk(2, -1)
        return mu, logvar, mu + (0.5 * logvar).exp() * torch.randn_like(mu)


class VC(Recipe):
    """Variational Clustering (seed 000): trained from scratch end to end on the ELBO summed over y (exactly where
    k ≤ `decoded`, else over each image's likeliest clusters: `reconstruction`); the cluster is argmax q(y|x).
    Our choices: a Bernoulli decoder, one z sample per y, a uniform p(y), and two terms on
    q(y|x) that the ELBO alone lacks (without them it collapsed, or followed stroke style, in our runs):
    - balance: KL(q̄(y) ‖ p(y)) over the batch (weight balance_weight), so every cluster stays in use;
    - consistency: two augmented views of an image get the same y, SCAN's −log<q(y|a), q(y|b)>
      (weight consistency_weight; 0 = no views: the ELBO and balance term on the images alone).
    SCAN's steps (`scan.py`) can come before, alongside and after the ELBO: a representation stage trains the
    encoder's features (contrast_epochs), q(y|x) agrees with a mined neighbour's (neighbours), and the confident
    images self-label (selflabel_epochs).
    """

    Settings = VCSettings

    def __init__(self, cfg, channels: int, side: int, colour: bool = True):
        super().__init__(cfg, channels, side, colour)
        self.scan = Scan(cfg.method, "elbo", channels, side, self.colour)  # SCAN's steps: `scan.py`

    def build(self) -> VCNet:
        c, s = self.cfg, self.cfg.method
        return VCNet(self.channels, self.side, c.k, s.code_dim, s.conv_widths, s.ae_widths,
                     projected=bool(s.contrast_epochs))

    def stages(self) -> list[Stage]:
        s = self.cfg.method
        return make_stages(**{CONTRAST: s.contrast_epochs, "elbo": self.cfg.joint_epochs,
                              SELFLABEL: s.selflabel_epochs})

    def clusters_in(self, stage: Stage) -> bool:
        return stage.name != CONTRAST  # before the ELBO, q(y|x) is untrained

    def representation(self, model: VCNet):
        return model.features if self.has_representation else None

    def encoder_of(self, model: VCNet) -> nn.Module:
        return model.trunk

    def start_epoch(self, stage, epoch, model: VCNet, images: torch.Tensor, comm) -> None:
        self.scan.hold(self.encoder_of(model), stage)
        if self.scan.needs_refresh(stage):
            self.scan.refresh(model, images, comm, self.representation(model), fine_proba(model, images))

    def loss(self, stage, model: VCNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s = self.cfg.method
        if stage.name == CONTRAST:  # SimCLR: the instance loss alone, on projections of the encoder's features
            return self.scan.contrast_loss(model.features, model.projector, x)
        if stage.name == SELFLABEL:  # q(y|·) of a view, on the confident images' clusters
            return self.scan.selflabel(model.embed(self.view(x)).log_softmax(-1), idx)
        two_views = s.consistency_weight > 0
        if two_views:  # the ELBO models view a; view b only informs q(y|·)
            x, x_b = self.view(x), self.view(x)
            h, h_b = model.features(torch.cat([x, x_b])).chunk(2)
        else:
            h = model.features(x)
        logits = model.to_y(h)
        mu, logvar, z = model.posterior_z(h)
        rec = self.reconstruction(model, x, z, logits)
        k = z.shape[1]
        kl_z = losses.gaussian_kl(mu.float(), logvar.float(), model.prior_mu, model.prior_logvar)  # (B, K)
        log_prior_y = torch.full((k,), -math.log(k), device=x.device)
        loss = losses.mixture_elbo_loss(logits, rec, kl_z, log_prior_y) / x[0].numel()  # per pixel
        loss = loss + s.balance_weight * losses.marginal_prior_kl(logits, log_prior_y)
        if two_views:
            loss = loss + s.consistency_weight * losses.view_consistency(logits, model.to_y(h_b))
        if s.neighbours and idx is not None:  # held images: their neighbours' posteriors are banked
            loss = loss + s.neighbour_weight * self.scan.agreement(logits.float().log_softmax(-1), idx)
        return loss

    def reconstruction(self, model: VCNet, x: torch.Tensor, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) −log p(x|z_y) for each y. Decoded under the `decoded` clusters most likely by q(y|x) only: the
        exact sum decodes every image K times, which over-clustering (train.over_cluster) multiplies. Each other
        cluster counts at the worst reconstruction decoded, held constant, so q(y|x) leaves it as it would a bad
        one; q(y|x) is sharp once trained, and those clusters carry little of its mass."""
        b, k, d = z.shape
        m = min(k, self.cfg.method.decoded)
        top = logits.detach().topk(m, 1).indices if m < k else None
        if top is not None:
            z = z.gather(1, top[..., None].expand(-1, -1, d))  # (B, m, D)
        x_logits = model.decoder(z.reshape(b * m, d)).float()  # (B*m, C, H, W)
        rec = losses.bernoulli_nll(x_logits, x.repeat_interleave(m, 0)).view(b, m)
        if top is None:
            return rec
        return rec.detach().amax(1, keepdim=True).expand(b, k).scatter(1, top, rec)
