"""A faster dropout for CPU training.

torch's CPU dropout draws one Mersenne-Twister number per element: 3.8 ms for an 8 x 51 x 576
activation on the 2-core bench machine. LoRA puts a dropout on the input of each of its 7
projections in every layer, and a profile of one SmolLM2 LoRA training step showed dropout's
``bernoulli_`` taking 17% of the step. One 64-bit draw gives four 16-bit uniforms, which makes the
same dropout 2.6x faster. Written by hand: torch has no cheaper CPU generator. On CUDA torch's fused
Philox dropout is already cheap, so the modules are only swapped for CPU training.

Encoders also drop attention probabilities, which no module holds: textclf.components.attention_dropout.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16  # 16-bit uniforms: the drop probability is rounded to a multiple of 1/65536


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` (training mode) with a mask cut from 64-bit random integers."""
    count = x.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
    uniforms = words.view(torch.int16)[:count].view(x.shape)  # each in [-32768, 32767], uniform
    keep = uniforms >= round(p * _LEVELS) - _LEVELS // 2
    # One multiply by a pre-scaled mask: half the time of mask-then-scale, forward and backward.
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class FastCPUDropout(nn.Module):
    """Inverted dropout (zero with probability ``p``, scale the rest by ``1 / (1 - p)``) with a
    mask cut from 64-bit random integers; identical to ``nn.Dropout`` in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return fast_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Replace every active ``nn.Dropout`` in ``model`` (LoRA's included) by :class:`FastCPUDropout`.

    Dropout holds no weights, so saved models and adapters are unchanged. Returns how many were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, FastCPUDropout(child.p))
                replaced += 1
    return replaced
