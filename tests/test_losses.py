import torch

from clustering import losses


def test_student_t_rows_sum_to_one_and_prefer_nearest():
    z = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    mu = torch.tensor([[0.0, 0.1], [5.0, 4.9]])
    q = losses.student_t_assign(z, mu)
    torch.testing.assert_close(q.sum(1), torch.ones(2))
    assert q.argmax(1).tolist() == [0, 1]


def test_cah_target_sharpens_q():
    q = torch.softmax(torch.randn(64, 5), 1)
    p = losses.cah_target(q, q.sum(0))
    torch.testing.assert_close(p.sum(1), torch.ones(64))
    entropy = lambda d: -(d * d.log()).sum(1)  # noqa: E731
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
