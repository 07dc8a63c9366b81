"""Each method a short recipe: encoder × non-clustering loss × clustering loss × head × schedule (seed 001's taxonomy).

A recipe builds its network, names its stages, and gives the loss of one batch in each stage; the
engine (engine.py) runs it in one process or on N workers alike.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from . import losses
from .augment import view_for
from .comm import Comm
from .config import TrainConfig
from .encoders import ConvAutoencoder, ConvNet, MLPAutoencoder, ResNet18, Trunk
from .heads import KMeansHead, MixtureHead, SoftmaxHead, StudentTHead
from .schedule import Stage, make_stages


def build_autoencoder(cfg: TrainConfig, channels: int, side: int) -> nn.Module:
    if cfg.encoder == "mlp":
        return MLPAutoencoder(channels, side, cfg.code_dim, cfg.mlp_widths)
    return ConvAutoencoder(channels, side, cfg.code_dim, cfg.ae_widths)


class Clusterer(nn.Module):
    """Every model: `embed(x)` gives what its `head` turns into cluster posteriors."""

    head: nn.Module

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.predict_proba(self.embed(x))  # (B, K)


class ClusterNet(Clusterer):
    """An autoencoder with a clustering head on its code."""

    def __init__(self, ae: nn.Module, head: StudentTHead):
        super().__init__()
        self.ae, self.head = ae, head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(x)  # (B, D)


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
    """(posteriors (N, K), codes (N, D)) of uint8 images (N, C, H, W) on the model's device."""
    z = embed_all(model, images, batch)
    return model.head.predict_proba(z), z


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255.0)


class Recipe:
    """What the engine calls; a recipe overrides the hooks it needs (the rest do nothing)."""

    def __init__(self, cfg: TrainConfig, channels: int, side: int):
        self.cfg, self.channels, self.side = cfg, channels, side

    def stages(self) -> list[Stage]:
        return []

    def start_stage(self, stage: Stage, model: Clusterer, images: torch.Tensor, comm: Comm) -> dict:
        return {}

    def start_epoch(self, stage: Stage, epoch: int, model: Clusterer, images: torch.Tensor, comm: Comm) -> None:
        pass

    def end_epoch(self, stage: Stage, epoch: int, model: Clusterer, comm: Comm) -> dict:
        """After an epoch's steps, before its checkpoint: state learnt over the epoch goes into the model here, so
        a run resumed from that checkpoint continues exactly. Returns what the epoch's metrics should show."""
        return {}

    def finish(self, model: Clusterer, images: torch.Tensor, comm: Comm) -> dict:
        return {}

    def clusters_in(self, stage: Stage) -> bool:
        """Whether a run stopped in this stage would already cluster (after `finish`)."""
        return True


def fit_head(model: Clusterer, images: torch.Tensor, comm: Comm, seed: int) -> dict:
    """k-means on every image's code (all ranks), as the centres of the model's head."""
    model.head.fit(embed_all(model, images), comm, seed=seed)
    return {"reseeded_clusters": model.head.reseeded_}


class AEClustering(Recipe):
    """Autoencoder + Student-t head, the family of seed 001's taxonomy:

    - dcec (DCEC-CAH, seed 001): pretrain the AE on MSE; centres from k-means on the codes; then jointly
      minimise KL(P‖Q) + λ·MSE with the hardened target P refreshed from Q over the whole dataset.
      Final labels: k-means on the final codes (as the authors).
      With cfg.augment, both stages train on random views (DEC-DA, Guo et al. 2018): the AE reconstructs the
      view, and the view's Q is pulled towards the P of the clean image. On 10,000 MNIST images (CPU, 40 + 12
      epochs) this gave ACC 0.815 vs 0.763 without views and 0.734 reconstructing the clean image from the view.
    - idec: the same objective (IDEC's L_r + γ L_c is KL + (1/γ)·MSE); the MLP encoder in its paper.
    - dec: the joint stage drops the decoder (KL alone).
    - ae_kmeans: no joint stage, k-means on the pretrained codes.
    The encoder is `cfg.encoder` (conv for dcec, mlp for dec/idec in the papers).
    """

    def __init__(self, cfg: TrainConfig, channels: int, side: int, joint: bool = True, reconstruct: bool = True):
        super().__init__(cfg, channels, side)
        self.joint, self.reconstruct = joint, reconstruct
        self.view = view_for(channels)
        self.targets: torch.Tensor | None = None  # (N_local, K): P of the held rows, fixed between refreshes
        self.freq: torch.Tensor | None = None  # (K,) f_j of the last refresh, over every rank's images (or sample)

    def build(self) -> ClusterNet:
        c = self.cfg
        return ClusterNet(build_autoencoder(c, self.channels, self.side), StudentTHead(c.k, c.code_dim))

    def stages(self) -> list[Stage]:
        return make_stages(pretrain=self.cfg.pretrain_epochs, joint=self.cfg.joint_epochs if self.joint else 0)

    def start_stage(self, stage: Stage, model: ClusterNet, images: torch.Tensor, comm: Comm) -> dict:
        return fit_head(model, images, comm, self.cfg.seed) if stage.name == "joint" else {}

    def start_epoch(self, stage: Stage, epoch: int, model: ClusterNet, images: torch.Tensor, comm: Comm) -> None:
        if stage.name == "joint" and (self.targets is None or (epoch - stage.start) % self.cfg.target_every == 0):
            with torch.no_grad():
                q = model.head.predict_proba(embed_all(model, images))  # (N, K)
                self.freq = comm.sum(q.sum(0))  # f_j over the whole corpus, not one worker's share
                self.targets = losses.cah_target(q, self.freq)

    def target(self, q: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """P of a batch: the refresh's fixed P of held rows (idx); a streamed batch (no idx) has no held row, and
        gets P from its own Q (no gradient) with the refresh's f_j: DEC's target refreshed every step."""
        return self.targets[idx] if idx is not None else losses.cah_target(q.detach().float(), self.freq)

    def loss(self, stage: Stage, model: ClusterNet, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.augment:  # DEC-DA: learn on a random view of each image (its target P comes from the image)
            x = self.view(x)
        if stage.name == "joint" and not self.reconstruct:
            q = model.head(model.embed(x))
            return losses.kl_div(self.target(q, idx), q)
        z, x_hat = model.ae(x)
        rec = losses.reconstruction(x_hat, x)
        if stage.name == "pretrain":
            return rec
        q = model.head(z)  # (B, K)
        return losses.kl_div(self.target(q, idx), q) + self.cfg.rec_weight * rec

    def finish(self, model: ClusterNet, images: torch.Tensor, comm: Comm) -> dict:
        return fit_head(model, images, comm, self.cfg.seed)


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
    With cfg.instance_weight > 0 a representation loss joins them, as the paper fuses EM with representation
    learning: SimCLR's NT-Xent on a projection of the net's features (Contrastive Clustering's instance level,
    with NMM's EM in place of its cluster level).
    With cfg.heads > 1, that many sub-heads of K outputs train side by side on one net, each its own mixture,
    and the one with the lowest EM + consistency loss over the last epoch labels (IIC's sub-heads, Ji et al.
    2019): a partition that merged two classes early costs more than one that did not.
    With cfg.over_k > 0, one more mixture of over_k components trains alongside and labels nothing (IIC's
    over-clustering head): it asks the net to keep finer distinctions than K clusters need.
    With cfg.contrast_epochs > 0, a first stage ("pretrain") trains the net's features on the instance loss alone
    (SimCLR pretraining, SCAN's first step), so EM starts from features that already group similar images.
    """

    def __init__(self, cfg: TrainConfig, channels: int, side: int):
        super().__init__(cfg, channels, side)
        self.view = view_for(channels)
        self.resp_sum: torch.Tensor | None = None  # (H, K) Σ γ over this rank's batches in the current epoch
        self.head_loss_sum: torch.Tensor | None = None  # (H,) each sub-head's loss summed over those batches

    def build(self) -> MixtureNet:
        c = self.cfg
        if c.encoder == "resnet18":
            net = ResNet18(self.channels, c.k * c.heads + c.over_k)
        else:
            net = ConvNet(self.channels, self.side, c.k * c.heads + c.over_k, c.conv_widths)
        projected = c.instance_weight or c.contrast_epochs
        return MixtureNet(net, MixtureHead(c.k, c.heads), PROJECTION_DIM if projected else 0)

    def stages(self) -> list[Stage]:
        c = self.cfg
        return make_stages(pretrain=c.contrast_epochs, em=c.joint_epochs)

    def clusters_in(self, stage: Stage) -> bool:
        return stage.name == "em"  # before EM the mixture's outputs are untrained and their clusters say nothing

    def end_epoch(self, stage, epoch, model: MixtureNet, comm: Comm) -> dict:
        """π from the epoch's responsibilities, and the sub-head with the lowest loss labels."""
        if stage.name == "pretrain":  # π and the sub-head are EM's
            return {}
        model.head.set_weights(comm.sum(self.resp_sum), self.cfg.pi_momentum)
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
        if self.cfg.consistency_weight:
            per_head = per_head + self.cfg.consistency_weight * losses.view_consistency(log_ga + log_pi, log_gb + log_pi)
        return per_head, (gamma_a + gamma_b).sum(0).detach()

    def loss(self, stage, model: MixtureNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        views = torch.cat([self.view(x), self.view(x)])  # two views of each image, one pass (shared BN)
        if stage.name == "pretrain":  # SimCLR: the instance loss alone, on projections of the net's features
            proj = model.projector(model.net.features(views))
            return losses.instance_contrast(*proj.chunk(2))
        logits, proj = model.outputs_and_projections(views)
        c = self.cfg
        main, over = logits[:, :c.heads * c.k], logits[:, c.heads * c.k:]
        per_head, s = self.mixture_loss(main.unflatten(1, (-1, c.k)), model.head.log_pi_)
        with torch.no_grad():
            h = per_head.detach().float()
            self.resp_sum = s if self.resp_sum is None else self.resp_sum + s
            self.head_loss_sum = h if self.head_loss_sum is None else self.head_loss_sum + h
        loss = per_head.mean()
        if c.over_k:  # an over-clustering mixture with a fixed uniform π; it only shapes the net
            loss = loss + self.mixture_loss(over[:, None], torch.full((1, c.over_k), -math.log(c.over_k),
                                                                      device=x.device))[0].mean()
        if proj is not None:
            loss = loss + self.cfg.instance_weight * losses.instance_contrast(*proj.chunk(2))
        return loss

    def finish(self, model: MixtureNet, images: torch.Tensor, comm: Comm) -> dict:
        model.fit_normaliser(images, comm)
        return self.describe_head(model)


class VCNet(Clusterer):
    """Gaussian-mixture VAE (seed 000): q(y|x) categorical, q(z|x,y) Gaussian (the encoder sees x and y),
    p(z|y) = N(μ_y, σ_y²) learned, p(y) uniform, p(x|z) a Bernoulli conv decoder."""

    def __init__(self, channels: int, side: int, k: int, code_dim: int, widths: tuple[int, int],
                 decoder_widths: tuple[int, ...], hidden: int = 256):
        super().__init__()
        self.k = k
        self.trunk = ConvNet(channels, side, hidden, widths)  # x -> features
        self.to_y = nn.Linear(hidden, k)
        self.to_z = nn.Linear(hidden + k, 2 * code_dim)
        self.prior_mu = nn.Parameter(torch.randn(k, code_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(k, code_dim))
        self.decoder = ConvAutoencoder(channels, side, code_dim, decoder_widths).decoder
        self.head = SoftmaxHead()

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
    """Variational Clustering (seed 000): trained from scratch end to end on the exact-sum ELBO; the cluster
    is argmax q(y|x). Our choices: a Bernoulli decoder, one z sample per y, a uniform p(y), and two terms on
    q(y|x) that the ELBO alone lacks (without them it collapsed, or followed stroke style, in our runs):
    - balance: KL(q̄(y) ‖ p(y)) over the batch (weight cfg.balance_weight), so every cluster stays in use;
    - consistency: two augmented views of an image get the same y, SCAN's −log<q(y|a), q(y|b)>
      (weight cfg.consistency_weight; 0 = no views: the ELBO and balance term on the images alone).
    """

    def __init__(self, cfg: TrainConfig, channels: int, side: int):
        super().__init__(cfg, channels, side)
        self.view = view_for(channels)

    def build(self) -> VCNet:
        c = self.cfg
        return VCNet(self.channels, self.side, c.k, c.code_dim, c.conv_widths, c.ae_widths)

    def stages(self) -> list[Stage]:
        return make_stages(elbo=self.cfg.joint_epochs)

    def loss(self, stage, model: VCNet, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        two_views = self.cfg.consistency_weight > 0
        if two_views:  # the ELBO models view a; view b only informs q(y|·)
            x, x_b = self.view(x), self.view(x)
            h, h_b = model.features(torch.cat([x, x_b])).chunk(2)
        else:
            h = model.features(x)
        logits = model.to_y(h)
        mu, logvar, z = model.posterior_z(h)
        b, k, d = z.shape
        x_logits = model.decoder(z.reshape(b * k, d)).float()  # (B*K, C, H, W)
        rec = losses.bernoulli_nll(x_logits, x.repeat_interleave(k, 0)).view(b, k)
        kl_z = losses.gaussian_kl(mu.float(), logvar.float(), model.prior_mu, model.prior_logvar)  # (B, K)
        log_prior_y = torch.full((k,), -math.log(k), device=x.device)
        loss = losses.mixture_elbo_loss(logits, rec, kl_z, log_prior_y) / x[0].numel()  # per pixel
        loss = loss + self.cfg.balance_weight * losses.marginal_prior_kl(logits, log_prior_y)
        if two_views:
            loss = loss + self.cfg.consistency_weight * losses.view_consistency(logits, model.to_y(h_b))
        return loss


class PixelKMeans(Clusterer):
    """The k-means-on-pixels baseline as a model: the 'code' is the flattened image."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.head = KMeansHead(k, dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, C*H*W)


class KMeansBaseline(Recipe):
    """k-means on pixels (Lloyd, k-means++ init, best of n_init), distributed like every other head."""

    def build(self) -> PixelKMeans:
        return PixelKMeans(self.cfg.k, self.channels * self.side * self.side)

    def finish(self, model: PixelKMeans, images: torch.Tensor, comm: Comm) -> dict:
        return fit_head(model, images, comm, self.cfg.seed)


METHODS = {
    "dcec": AEClustering,
    "idec": AEClustering,
    "dec": partial(AEClustering, reconstruct=False),
    "ae_kmeans": partial(AEClustering, joint=False),
    "kmeans": KMeansBaseline,
    "nmm": NMM,
    "vc": VC,
}


def build_method(cfg: TrainConfig, channels: int, side: int):
    return METHODS[cfg.method](cfg, channels, side)
