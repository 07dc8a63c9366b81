"""Pure tensor functions: losses and soft assignments. Shapes: B batch, D code, K clusters."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel."""
    return F.mse_loss(x_hat.float(), x.float())


def sq_distances(z: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, D), (K, D) -> (B, K) squared Euclidean distances, as ‖z‖² − 2 z·μ + ‖μ‖² (no (B, K, D) tensor)."""
    z, centers = z.float(), centers.float()
    return (z.pow(2).sum(1, keepdim=True) - 2 * z @ centers.T + centers.pow(2).sum(1)).clamp_min_(0)


def student_t_assign(z: torch.Tensor, centers: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """q_ij ∝ (1 + ‖z_i − μ_j‖²/α)^(−(α+1)/2); rows sum to one. (B, K)"""
    q = (1.0 + sq_distances(z, centers) / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


def cah_target(q: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Hardened target p_ij = (q_ij²/f_j) / Σ_j' (q_ij'²/f_j'), f_j = Σ_i q_ij over the whole dataset.

    Squaring sharpens confident assignments; dividing by f_j keeps large clusters from swallowing the rest.
    """
    w = q.pow(2) / freq.clamp_min(1e-12)  # (B, K)
    return w / w.sum(1, keepdim=True)


def kl_div(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q), averaged over the batch."""
    p = p.float()
    return (p * (p.clamp_min(1e-12).log() - q.float().clamp_min(1e-12).log())).sum(1).mean()


def batch_densities(logits: torch.Tensor) -> torch.Tensor:
    """NMM transformation (seed 002): log g_k(x_i), each output k normalised over the batch.

    Each column is a distribution over the batch's samples, so no component can claim every sample
    by growing its logits: that is what rules out the trivial one-cluster solution. (B, K) or (B, H, K)
    """
    return torch.log_softmax(logits.float(), dim=0)


def e_step(log_g: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Responsibilities γ_ik = π_k g_k(x_i) / Σ_j π_j g_j(x_i); no gradient flows through them. (B, K), or
    (B, H, K) for H sub-heads side by side (log_pi (H, K))."""
    return torch.softmax(log_g.detach() + log_pi, dim=-1)


def m_step(gamma: torch.Tensor, log_g: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Negative expected complete-data log-likelihood −(1/B) Σ_i Σ_k γ_ik log(π_k g_k(x_i)); minimise it.
    A scalar, or one per sub-head (H,) for (B, H, K) inputs."""
    return -(gamma * (log_g + log_pi)).sum(-1).mean(0)


def view_consistency(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Two views of an image should fall in the same cluster: −log Σ_k p_k(a) p_k(b), averaged (SCAN's form).
    Inputs are the two views' posterior logits, any normalisation (B, K); or (B, H, K) for one value per sub-head."""
    log_p_a, log_p_b = torch.log_softmax(logits_a.float(), -1), torch.log_softmax(logits_b.float(), -1)
    return -torch.logsumexp(log_p_a + log_p_b, dim=-1).mean(0)


def instance_contrast(proj_a: torch.Tensor, proj_b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: each view must pick out its twin among the 2B − 1 other views of the batch, by cosine
    similarity / temperature. The instance-level representation loss of Contrastive Clustering (Li et al. 2021).
    Inputs are the two views' projections (B, P)."""
    z = F.normalize(torch.cat([proj_a, proj_b]).float(), dim=1)  # (2B, P)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own twin
    b = len(proj_a)
    twin = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, twin)


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) for diagonal Gaussians, summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """−log p(x|z) for pixels in [0, 1] under a Bernoulli decoder, summed over pixels. (B,)"""
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(1)


def mixture_elbo_loss(logits_y: torch.Tensor, rec_nll: torch.Tensor, kl_z: torch.Tensor,
                      log_prior_y: torch.Tensor) -> torch.Tensor:
    """Negative ELBO of a VAE with a discrete y and continuous z, summing over every y exactly (seed 000):

    −ELBO = Σ_y q(y|x) [−log p(x|z_y) + KL(q(z|x,y) ‖ p(z|y))] + KL(q(y|x) ‖ p(y)),
    rec_nll and kl_z are (B, K) (one z sample per y), logits_y (B, K), log_prior_y (K,). Batch mean.
    """
    log_q = torch.log_softmax(logits_y.float(), 1)
    q = log_q.exp()
    kl_y = (q * (log_q - log_prior_y)).sum(1)
    return ((q * (rec_nll + kl_z)).sum(1) + kl_y).mean()


def marginal_prior_kl(logits_y: torch.Tensor, log_prior_y: torch.Tensor) -> torch.Tensor:
    """KL(q̄(y) ‖ p(y)) with q̄ the batch mean of q(y|x): a balance term that keeps every cluster in use
    (the per-sample KL in the ELBO lets q(y|x) collapse onto one cluster)."""
    q_bar = torch.softmax(logits_y.float(), 1).mean(0)
    return (q_bar * (q_bar.clamp_min(1e-8).log() - log_prior_y)).sum()
