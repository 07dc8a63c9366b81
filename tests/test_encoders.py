import pytest
import torch

from clustering.encoders import ConvAutoencoder, MLPAutoencoder


@pytest.mark.parametrize("channels,side", [(1, 8), (1, 28), (3, 32), (1, 7)])
def test_conv_autoencoder_restores_the_input_shape(channels, side):
    ae = ConvAutoencoder(channels, side, code_dim=10)
    z, x_hat = ae(torch.rand(3, channels, side, side))
    assert z.shape == (3, 10) and x_hat.shape == (3, channels, side, side)


def test_mlp_autoencoder_restores_the_input_shape():
    z, x_hat = MLPAutoencoder(3, 8, code_dim=5, widths=(32, 16))(torch.rand(2, 3, 8, 8))
    assert z.shape == (2, 5) and x_hat.shape == (2, 3, 8, 8)
