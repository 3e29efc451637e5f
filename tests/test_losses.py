import math

import torch
from torch import nn

from dcgan_dist import registry
from dcgan_dist.gan.losses import G_OBJECTIVES, OBJECTIVES, adversarial_loss


def test_bce_on_logits_equals_the_seed_sigmoid_and_bceloss():
    logits = torch.randn(64)
    seed = nn.BCELoss()
    loss = adversarial_loss("bce", real_target=0.9, g_target=0.9)  # configs/mnist.yaml's targets
    p = torch.sigmoid(logits)
    torch.testing.assert_close(loss.d_real(logits), seed(p, torch.full((64,), 0.9)))
    torch.testing.assert_close(loss.d_fake(logits), seed(p, torch.zeros(64)))
    torch.testing.assert_close(loss.g(logits), seed(p, torch.full((64,), 0.9)))


def test_generator_objectives():
    logits = torch.randn(32)
    d = torch.sigmoid(logits)
    ns = adversarial_loss("bce", g_loss="non_saturating")
    mm = adversarial_loss("bce", g_loss="minimax")
    torch.testing.assert_close(ns.g(logits), -torch.log(d).mean())  # maximise log D(G(z))
    torch.testing.assert_close(mm.g(logits), torch.log(1 - d).mean())  # minimise log(1 - D(G(z)))


def test_optimal_discriminator_gives_log4():
    # D* = 1/2 everywhere when p_g = p_data: L_D = -[log D(x) + log(1 - D(G(z)))] = log 4, JSD estimate 0
    zero = torch.zeros(16)
    loss = adversarial_loss()
    loss_d = (loss.d_real(zero) + loss.d_fake(zero)).item()
    assert math.isclose(loss_d, math.log(4), rel_tol=1e-6)
    assert abs(loss.theory(loss_d)["theory/jsd_estimate"]) < 1e-6
    assert adversarial_loss(real_target=0.9).theory(loss_d) == {}  # smoothed labels: no such estimate
    assert adversarial_loss("hinge").theory(loss_d) == {}


def test_every_registered_loss_is_implemented_and_nothing_else():
    # a loss name is added in the registry and here, nowhere else
    assert set(OBJECTIVES) == set(registry.LOSSES)
    assert set(G_OBJECTIVES) == set(registry.LOSSES["bce"].g_losses)


def test_hinge():
    loss = adversarial_loss("hinge")
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert loss.d_real(real).item() == (0 + 0.5) / 2
    assert loss.d_fake(fake).item() == (0 + 1.5) / 2
    assert loss.g(fake).item() == 0.75


def test_losses_are_fp32_under_bf16_logits():
    loss = adversarial_loss()
    assert loss.d_real(torch.randn(4, dtype=torch.bfloat16)).dtype == torch.float32
