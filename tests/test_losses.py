import math

import torch

from clustering.model import losses


def test_student_t_rows_sum_to_one_and_prefer_nearest():
    z = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    mu = torch.tensor([[0.0, 0.1], [5.0, 4.9]])
    q = losses.student_t_assign(z, mu)
    torch.testing.assert_close(q.sum(1), torch.ones(2))
    assert q.argmax(1).tolist() == [0, 1]


def test_cah_target_sharpens_q():
    # Seeded: dividing by the cluster frequencies f_j may move a near-tied argmax (3 of 200 seeds fail the 0.9)
    q = torch.softmax(torch.randn(64, 5, generator=torch.Generator().manual_seed(0)), 1)
    p = losses.cah_target(q, q.sum(0))
    torch.testing.assert_close(p.sum(1), torch.ones(64))
    entropy = lambda d: -(d * d.log()).sum(1)
    assert (entropy(p) < entropy(q)).float().mean() > 0.9
    assert (p.argmax(1) == q.argmax(1)).float().mean() > 0.9


def test_kl_is_zero_only_at_the_target():
    p = torch.softmax(torch.randn(8, 4), 1)
    assert losses.kl_div(p, p).abs() < 1e-6
    assert losses.kl_div(p, torch.softmax(torch.randn(8, 4), 1)) > 0


def test_reconstruction_minimal_at_identity():
    x = torch.rand(4, 1, 8, 8)
    assert losses.reconstruction(x, x) == 0
    assert losses.reconstruction(x + 0.1, x) > 0


def test_em_responsibilities_sum_to_one_and_m_step_raises_batch_likelihood():
    torch.manual_seed(0)
    logits = torch.randn(32, 4, requires_grad=True)
    log_pi = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))

    def batch_loglik():
        return torch.logsumexp(losses.batch_densities(logits) + log_pi, 1).sum()

    gamma = losses.e_step(losses.batch_densities(logits), log_pi)
    torch.testing.assert_close(gamma.sum(1), torch.ones(32))
    before = batch_loglik().item()
    losses.m_step(gamma, losses.batch_densities(logits), log_pi).backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    assert batch_loglik().item() > before


def test_m_step_favours_even_clusters_only_under_a_uniform_prior():
    """Hard, sharp clusters of sizes n_k in a batch of B: with π tracking the sizes, the M-step loss is log B
    whatever the sizes, so nothing holds the clusters even; with a uniform π it is lowest for even clusters."""
    def hard_batch(sizes):
        labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        gamma = torch.nn.functional.one_hot(labels, len(sizes)).float()
        return losses.batch_densities(gamma * 50.0), gamma  # each column uniform on its members

    even, uneven = [8, 8, 8, 8], [20, 6, 4, 2]
    uniform = torch.full((4,), 0.25).log()
    loss = {}
    for name, sizes in (("even", even), ("uneven", uneven)):
        log_g, gamma = hard_batch(sizes)
        tracked = (torch.tensor(sizes, dtype=torch.float) / 32).log()
        loss[name] = (losses.m_step(gamma, log_g, tracked).item(), losses.m_step(gamma, log_g, uniform).item())
    assert abs(loss["even"][0] - loss["uneven"][0]) < 1e-4  # π tracking: indifferent to the sizes
    assert abs(loss["even"][0] - math.log(32)) < 1e-4
    assert loss["even"][1] < loss["uneven"][1] - 0.1  # uniform π: even clusters are preferred


def test_gaussian_kl_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    mu_q, lv_q, mu_p, lv_p = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    expected = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp())).sum(-1)
    torch.testing.assert_close(losses.gaussian_kl(mu_q, lv_q, mu_p, lv_p), expected)


def test_mixture_elbo_closed_form_when_q_y_is_certain():
    # q(y|x) puts all mass on y=1: -ELBO = rec_1 + KL_z,1 + KL(one-hot ‖ uniform) = rec_1 + KL_z,1 + log K
    logits = torch.tensor([[-1e4, 1e4, -1e4]])
    rec, kl_z = torch.tensor([[5.0, 2.0, 7.0]]), torch.tensor([[1.0, 0.5, 3.0]])
    log_prior = torch.full((3,), -torch.log(torch.tensor(3.0)))
    torch.testing.assert_close(losses.mixture_elbo_loss(logits, rec, kl_z, log_prior), torch.tensor(2.5 + torch.log(torch.tensor(3.0)).item()))


def test_balance_term_is_zero_only_when_clusters_are_used_evenly():
    log_prior = torch.full((4,), -torch.log(torch.tensor(4.0)))
    even = torch.eye(4)  # each sample sure of a different cluster
    assert losses.marginal_prior_kl(even * 50, log_prior).abs() < 1e-5
    assert losses.marginal_prior_kl(torch.tensor([[50.0, 0, 0, 0]] * 4), log_prior) > 1.0


def test_instance_contrast_closed_forms():
    b, t = 4, 0.5
    # every view alike: the twin is one of 2B − 1 equal candidates
    same = torch.ones(b, 3)
    torch.testing.assert_close(losses.instance_contrast(same, same, t), torch.tensor(math.log(2 * b - 1)))
    # twins identical, other images orthogonal: cosine 1 for the twin, 0 for the 2B − 2 others
    eye = torch.eye(b)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * b - 2))
    torch.testing.assert_close(losses.instance_contrast(eye, eye, t), torch.tensor(expected))
    # the wrong pairing (each view's twin is another image) costs more
    assert losses.instance_contrast(eye, eye.roll(1, 0), t) > losses.instance_contrast(eye, eye, t) + 1


def test_sub_heads_side_by_side_give_each_heads_own_losses():
    torch.manual_seed(0)
    la, lb = torch.randn(16, 3, 4), torch.randn(16, 3, 4)  # (B, H, K): three sub-heads
    log_pi = torch.softmax(torch.randn(3, 4), 1).log()
    log_ga, log_gb = losses.batch_densities(la), losses.batch_densities(lb)
    em = losses.m_step(losses.e_step(log_gb, log_pi), log_ga, log_pi)
    cons = losses.view_consistency(log_ga + log_pi, log_gb + log_pi)
    assert em.shape == cons.shape == (3,)
    for h in range(3):  # the same as each sub-head on its own
        ga, gb = losses.batch_densities(la[:, h]), losses.batch_densities(lb[:, h])
        torch.testing.assert_close(em[h], losses.m_step(losses.e_step(gb, log_pi[h]), ga, log_pi[h]))
        torch.testing.assert_close(cons[h], losses.view_consistency(ga + log_pi[h], gb + log_pi[h]))
