import pytest
import torch
from torch import nn

from dcgan_dist.data.sources import facts
from dcgan_dist.gan.models import Discriminator, Generator, init_weights
from dcgan_dist.recipe import load_config


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
    g_kw, d_kw = cfg.model_kwargs(facts(cfg.data, cfg.model).channels)
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


# --- class-conditional models and spectral norm ---------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128, 256])
@pytest.mark.parametrize("cond", ["projection", "concat"])
def test_conditional_generator_and_discriminator_at_every_size(size, cond):
    torch.manual_seed(0)
    k, z = 5, torch.randn(4, 16)
    G = Generator(latent_dim=16, channels=3, image_size=size, width=4, num_classes=k, cond=cond)
    D = Discriminator(channels=3, image_size=size, width=4, num_classes=k, cond=cond)
    G.apply(init_weights), D.apply(init_weights)
    y = torch.tensor([0, 1, 3, 4])
    x = G(z, y)
    assert x.shape == (4, 3, size, size)
    logits = D(x, y)
    assert logits.shape == (4,)
    # the label matters to both networks: other classes give other images and other logits
    assert not torch.allclose(G(z, (y + 1) % k), x)
    assert not torch.allclose(D(x.detach(), (y + 1) % k), logits.detach())
    logits.sum().backward()
    if cond == "projection":  # the learned embeddings get gradients through G's image and D's projection
        label_grads = [G.embed.weight.grad[y], D.embed.weight.grad[y]]
    else:  # one-hot: the weights that read the label (z's extra inputs to G; D's extra input maps)
        label_grads = [G.main[0].weight.grad[16:][y], D.main[0].weight.grad[:, 3:].transpose(0, 1)[y]]
    for grad in label_grads:  # one row per requested class, each reached
        assert torch.isfinite(grad).all() and all(row.abs().sum() > 0 for row in grad)


def test_projection_discriminator_is_psi_plus_the_inner_product():
    """logit = psi(phi(x)) + <embed(y), phi(x)>, phi(x) the sum-pooled last features (Miyato & Koyama 2018)."""
    torch.manual_seed(0)
    D = Discriminator(channels=1, image_size=32, width=8, num_classes=10).eval()
    D.apply(init_weights)
    x, y = torch.randn(6, 1, 32, 32), torch.arange(6)
    phi = D.main[:-1](x)
    expected = D.main[-1](phi).view(-1) + (D.embed.weight[y] * phi.sum((2, 3))).sum(1)
    torch.testing.assert_close(D(x, y), expected)


def test_unconditional_defaults_are_unchanged_and_labels_are_refused_or_required():
    torch.manual_seed(0)
    a = Generator(num_classes=0, spectral_norm=False).state_dict()
    torch.manual_seed(0)
    b = Generator().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError, match="labels"):
        Generator(latent_dim=8, image_size=32, width=4)(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match="labels"):
        Discriminator(image_size=32, width=4, num_classes=3)(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("cond", ["projection", "concat"])
def test_spectral_norm_bounds_every_layer_of_d_and_optionally_g(cond):
    torch.manual_seed(0)
    D = Discriminator(image_size=32, width=8, num_classes=10, cond=cond, spectral_norm=True)
    G = Generator(latent_dim=8, image_size=32, width=8, num_classes=10, cond=cond, spectral_norm=True)
    D.apply(init_weights), G.apply(init_weights)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8)
    for _ in range(30):  # power iterations (one per training forward)
        D(x, y), G(torch.randn(8, 8), y)
    for net in (D, G):
        layers = [m for m in net.modules() if hasattr(m, "parametrizations")]
        assert layers and all(m.parametrizations.weight.original.requires_grad for m in layers)
        for m in layers:
            w = m.weight.detach()
            w = w.transpose(0, 1) if isinstance(m, nn.ConvTranspose2d) else w  # torch's own matrix view
            assert torch.linalg.matrix_norm(w.flatten(1), ord=2) == pytest.approx(1.0, abs=0.05)
    keys = set(D.state_dict())
    assert "main.0.parametrizations.weight.original" in keys and "main.0.weight" not in keys


def test_spectral_norm_reaches_the_mlp_arch_too():
    G = Generator(latent_dim=8, image_size=32, width=4, arch="mlp", spectral_norm=True)
    D = Discriminator(image_size=32, width=4, arch="mlp", spectral_norm=True)
    for net in (G, D):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert linears and all(hasattr(m, "parametrizations") for m in linears)
    assert D(G(torch.randn(3, 8))).shape == (3,)


def test_every_registered_arch_is_built_and_nothing_else():
    # an architecture's name is added in the registry and here, nowhere else
    from dcgan_dist import registry
    from dcgan_dist.gan.models import DISCRIMINATORS, GENERATORS

    assert set(GENERATORS) == set(DISCRIMINATORS) == set(registry.ARCHS)
    for arch in registry.ARCHS:
        G, D = Generator(16, 3, 32, 8, arch=arch), Discriminator(3, 32, 8, arch=arch)
        images = G(torch.randn(2, 16))
        assert images.shape == (2, 3, 32, 32) and D(images).shape == (2,)
