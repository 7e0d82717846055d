"""Helpers shared by the conversion tests."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial random values (norm weights near 1, biases and tokens non-zero).

    Fresh timm / transformers models start with zero biases and unit norms, which would hide a missing
    bias or a misplaced LayerNorm in a conversion.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim == 1 and leaf in ("weight", "gamma"):
            param.copy_(1.0 + 0.2 * noise)  # norm weights, layer scales
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        else:
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(noise / max(fan_in, 1) ** 0.5)
    return model


def capture_outputs(modules: list[nn.Module]) -> tuple[list[torch.Tensor], list]:
    """Register forward hooks that record each module's output tensor; returns (outputs, handles)."""
    outputs: list[torch.Tensor] = []

    def hook(module, inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in modules]
    return outputs, handles
