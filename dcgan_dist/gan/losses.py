"""Adversarial objectives on D's logits, one class per loss name of `registry.LOSSES` (`OBJECTIVES`). The loss
owns the GAN maths; the loop owns everything else.

With D(x) = sigmoid(l):  -log D(x) = softplus(-l)  and  -log(1 - D(x)) = softplus(l).

An objective's `d_real`, `d_fake` and `g` each return a scalar to minimise (fp32, whatever the logits' dtype);
D's loss is d_real + d_fake. `theory(loss_d)` gives what D's loss estimates near an optimal D, where the
objective says (logged beside the losses). A new loss: its class here, its entry in `OBJECTIVES` and its
`registry.LOSSES` row, which says whether it takes label targets and which G objectives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dcgan_dist.registry import LOSSES


class BCE:
    """The seed's objective, min_G max_D E[log D(x)] + E[log(1 - D(G(z)))], as BCE on the logits.

    `real_target` < 1 is one-sided label smoothing of D's real targets. G's objective `g_loss` (`G_OBJECTIVES`):
    non_saturating (maximise log D(G(z)): BCE against `g_target`; the seed uses 0.9, its real label) or minimax
    (minimise log(1 - D(G(z))), the formula as written)."""

    def __init__(self, g_loss: str = "non_saturating", real_target: float = 1.0, g_target: float = 1.0):
        self.g_objective, self.real_target, self.g_target = G_OBJECTIVES[g_loss], real_target, g_target

    def d_real(self, logits: torch.Tensor) -> torch.Tensor:
        return _bce(logits, self.real_target)  # -[t log D(x) + (1-t) log(1 - D(x))]

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor:
        return _bce(logits, 0.0)  # -log(1 - D(G(z)))

    def g(self, logits: torch.Tensor) -> torch.Tensor:
        return self.g_objective(logits, self.g_target)

    def theory(self, loss_d: float) -> dict[str, float]:
        # near an optimal D, L_D = log 4 - 2 JSD(p_data || p_g)  (unsmoothed labels only)
        return {"theory/jsd_estimate": (math.log(4) - loss_d) / 2} if self.real_target == 1.0 else {}


G_OBJECTIVES = {  # BCE's G objectives by registry.LOSSES["bce"].g_losses' names
    "non_saturating": lambda logits, target: _bce(logits, target),  # -log D(G(z)) when target = 1
    "minimax": lambda logits, target: -_bce(logits, 0.0),  # log(1 - D(G(z))) = -softplus(l)
}


class Hinge:
    """Hinge: D minimises relu(1 - l_real) + relu(1 + l_fake), G minimises -l_fake."""

    def d_real(self, logits: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - logits.float()).mean()

    def d_fake(self, logits: torch.Tensor) -> torch.Tensor:
        return F.relu(1 + logits.float()).mean()

    def g(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.float().mean()

    def theory(self, loss_d: float) -> dict[str, float]:
        return {}


OBJECTIVES = {"bce": BCE, "hinge": Hinge}  # by registry.LOSSES' names


def adversarial_loss(name: str = "bce", g_loss: str = "non_saturating", real_target: float = 1.0,
                     g_target: float = 1.0) -> BCE | Hinge:
    """The objective `name` with the options its `registry.LOSSES` row says it takes (validation has refused
    the others)."""
    info, kwargs = LOSSES[name], {}
    if info.g_losses:
        kwargs["g_loss"] = g_loss
    if info.label_targets:
        kwargs |= {"real_target": real_target, "g_target": g_target}
    return OBJECTIVES[name](**kwargs)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
