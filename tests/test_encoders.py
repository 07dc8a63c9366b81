import pytest
import torch

from clustering.model.encoders import ConvAutoencoder, ConvNet, MLPAutoencoder, ResNet18


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
