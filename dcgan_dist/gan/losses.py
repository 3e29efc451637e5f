"""Adversarial objectives on D's logits. The loss owns the GAN maths; the loop owns everything else.

With D(x) = sigmoid(l):  -log D(x) = softplus(-l)  and  -log(1 - D(x)) = softplus(l).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AdversarialLoss:
    """`d_real`, `d_fake` and `g` each return a scalar to minimise.

    name="bce": the seed's objective, min_G max_D E[log D(x)] + E[log(1 - D(G(z)))]; D's loss is
    d_real + d_fake (the seed sums them). `real_target` < 1 is one-sided label smoothing of D's real
    targets. G's loss is `non_saturating` (maximise log D(G(z)), BCE against `g_target`; the seed uses
    g_target = 0.9, its real label) or `minimax` (minimise log(1 - D(G(z))), the formula as written).
    name="hinge": D: relu(1 - l_real) + relu(1 + l_fake); G: -l_fake.
    """

    def __init__(self, name: str = "bce", g_loss: str = "non_saturating", real_target: float = 1.0,
                 g_target: float = 1.0):
        # what is computed here (the names validation takes, and which loss takes which G objective: registry.LOSSES)
        assert name in ("bce", "hinge") and g_loss in ("non_saturating", "minimax"), (name, g_loss)
        self.name, self.g_loss, self.real_target, self.g_target = name, g_loss, real_target, g_target

    def d_real(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.name == "hinge":
            return F.relu(1 - logits).mean()
        return _bce(logits, self.real_target)  # -[t log D(x) + (1-t) log(1 - D(x))]

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.name == "hinge":
            return F.relu(1 + logits).mean()
        return _bce(logits, 0.0)  # -log(1 - D(G(z)))

    def g(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.name == "hinge":
            return -logits.mean()
        if self.g_loss == "minimax":
            return -_bce(logits, 0.0)  # log(1 - D(G(z))) = -softplus(l)
        return _bce(logits, self.g_target)  # -log D(G(z)) when g_target = 1


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
