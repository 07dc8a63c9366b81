import pytest
import torch

from clustering.encoders import ConvAutoencoder, ConvNet, MLPAutoencoder, ResNet18, Sobel


@pytest.mark.parametrize("channels,side", [(1, 8), (1, 28), (3, 32), (1, 7)])
def test_conv_autoencoder_restores_the_input_shape(channels, side):
    ae = ConvAutoencoder(channels, side, code_dim=10)
    z, x_hat = ae(torch.rand(3, channels, side, side))
    assert z.shape == (3, 10) and x_hat.shape == (3, channels, side, side)


def test_mlp_autoencoder_restores_the_input_shape():
    z, x_hat = MLPAutoencoder(3, 8, code_dim=5, widths=(32, 16))(torch.rand(2, 3, 8, 8))
    assert z.shape == (2, 5) and x_hat.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("channels, net", [(1, ConvNet(1, 8, 10, (4, 8), hidden=16)), (3, ResNet18(3, 10, width=4))],
                         ids=["conv", "resnet18"])
def test_trunk_features_feed_its_last_layer(channels, net):
    x = torch.rand(3, channels, 8, 8)
    net.eval()
    h = net.features(x)
    assert h.shape == (3, net.feature_dim)
    torch.testing.assert_close(net.from_features(h), net(x))


def test_sobel_sees_edges_not_colour():
    sobel = Sobel(3)
    flat = torch.rand(2, 3, 1, 1).expand(2, 3, 8, 8)  # one colour per image, no edge
    torch.testing.assert_close(sobel(flat)[..., 1:-1, 1:-1], torch.zeros(2, 2, 6, 6))
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0  # white right half: a vertical edge
    g = sobel(step)
    assert g.shape == (1, 2, 8, 8)
    assert g[0, 0, 1:-1, 3:5].abs().min() > 0 and g[0, 1, 1:-1, 1:-1].abs().max() < 1e-6  # across it only
    red, blue = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    red[:, 0, :, 4:], blue[:, 2, :, 4:] = 1.0, 0.299 / 0.114  # the same edge in gray, in two colours
    torch.testing.assert_close(sobel(red), sobel(blue))
    assert "weight" not in sobel.state_dict()  # a constant: checkpoints do not carry it
