import pytest
import torch
from torch import nn

from dcgan_dist.config import load_config
from dcgan_dist.models import Discriminator, Generator, init_weights


# A literal transcription of the reference recipe's networks (docs/DCGAN.md#the-reference-recipe), Sigmoid included.
class SeedGenerator(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 512, 4, 1, 0, bias=False), nn.BatchNorm2d(512), nn.ReLU(True),
            nn.ConvTranspose2d(512, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
            nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(True),
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
            nn.ConvTranspose2d(64, 1, 4, 2, 1, bias=False), nn.Tanh())


class SeedDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, 64, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(128, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(256, 512, 4, 2, 1, bias=False), nn.BatchNorm2d(512), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(512, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_mnist_config_is_the_seed_networks():
    cfg = load_config("configs/mnist.yaml")
    g_kw, d_kw = cfg.model_kwargs()
    seed_d = shapes(SeedDiscriminator())
    assert shapes(Generator(**g_kw)) == shapes(SeedGenerator(100))
    assert shapes(Discriminator(**d_kw)) == seed_d  # the Sigmoid has no parameters: D returns its logit
    assert (cfg.data.name, cfg.model.image_size, cfg.model.latent_dim) == ("mnist", 64, 100)
    assert cfg.train.batch_size == 128
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 2e-4, 0.5, 0.999)
    assert (cfg.loss.name, cfg.loss.g_loss, cfg.loss.real_target, cfg.loss.g_target) == (
        "bce", "non_saturating", 0.9, 0.9)
    assert cfg.train.steps == 50 * (60000 // 128)  # 50 epochs of full batches
    assert cfg.model.ema.decay == 0 and cfg.train.mixed_precision == "no"


def test_defaults_are_the_seed_networks():
    assert shapes(Generator()) == shapes(SeedGenerator(100))
    assert shapes(Discriminator()) == shapes(SeedDiscriminator())


def test_discriminator_returns_the_seed_sigmoid_as_logits():
    torch.manual_seed(0)
    ours, seed = Discriminator(), SeedDiscriminator()
    seed.load_state_dict(ours.state_dict())
    x = torch.randn(4, 1, 64, 64)
    torch.testing.assert_close(torch.sigmoid(ours(x)), seed(x).view(-1))


@pytest.mark.parametrize("size,blocks", [(32, 3), (64, 4), (128, 5), (256, 6)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_for_every_size(size, blocks, channels):
    g = Generator(latent_dim=8, channels=channels, image_size=size, width=4)
    d = Discriminator(channels=channels, image_size=size, width=4)
    x = g(torch.randn(2, 8))
    assert x.shape == (2, channels, size, size) and x.abs().max() <= 1
    assert d(x).shape == (2,)
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == blocks + 1  # the 4x4 projection plus one stride-2 block per doubling


def test_norm_none_has_no_batchnorm_and_biases():
    g, d = Generator(norm="none", width=8), Discriminator(norm="none", width=8)
    for net in (g, d):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert all(m.bias is not None for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def test_mlp_gan():
    g = Generator(arch="mlp", latent_dim=10, image_size=32, width=8)
    d = Discriminator(arch="mlp", image_size=32, width=8)
    assert not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in [*g.modules(), *d.modules()])
    x = g(torch.randn(3, 10))
    assert x.shape == (3, 1, 32, 32) and d(x).shape == (3,)


def test_seed_initialisation():
    torch.manual_seed(0)
    g = Generator()
    g.apply(init_weights)
    conv = g.main[3].weight
    bn = g.main[1]
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    assert abs(bn.weight.mean().item() - 1) < 0.01 and 0.01 < bn.weight.std().item() < 0.03
    assert torch.all(bn.bias == 0)


def test_shape_errors_name_the_expected_shape():
    with pytest.raises(AssertionError, match=r"z must be \[N, 100\]"):
        Generator()(torch.randn(2, 100, 1, 1))
    with pytest.raises(AssertionError, match="x must be"):
        Discriminator()(torch.randn(2, 3, 64, 64))
