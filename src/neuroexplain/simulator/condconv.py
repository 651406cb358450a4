"""Conditional convolution: a per-sample mixture of expert kernels.

CondConv (Yang, Bender, Le, Ngiam, NeurIPS 2019, "CondConv: Conditionally Parameterized
Convolutions for Efficient Inference") replaces the single kernel of a convolution by a mixture of
``K`` expert kernels whose weights are computed per sample by a small routing function. Liu,
Adeli, Pohl and Zhao (IPMI 2021, "Going Beyond Saliency Maps: Training Deep Models to Interpret
Deep Models") condition the routing additionally on the simulation direction ``o`` so that a
single simulator network can both inject (``o = -1``) and remove (``o = +1``) a disease effect.

The mixture is applied batched: the ``B`` per-sample kernels are stacked into one grouped
convolution with ``groups=B`` (one kernel-mixing matmul plus one ``conv3d`` call per layer,
whatever the batch size), which is numerically identical to convolving every sample with its own
mixed kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CondConv3d", "condition_vector"]


def condition_vector(
    condition: torch.Tensor | float, batch: int, dim: int, ref: torch.Tensor
) -> torch.Tensor:
    """Broadcast a condition to ``(B, dim)`` on the device / dtype of ``ref``.

    Args:
        condition: a scalar, or a tensor of shape ``()``, ``(B,)``, ``(1,)``, ``(B, dim)`` or
            ``(1, dim)``.
        batch: the batch size ``B``.
        dim: the condition size.
        ref: a tensor giving device and dtype.

    Returns:
        ``(B, dim)`` tensor.
    """
    c = torch.as_tensor(condition, device=ref.device, dtype=ref.dtype)
    if c.ndim == 0:
        c = c.reshape(1, 1)
    elif c.ndim == 1:
        c = c.reshape(-1, 1) if dim == 1 or c.shape[0] != dim else c.reshape(1, dim)
    if c.ndim != 2 or c.shape[1] not in (1, dim) or c.shape[0] not in (1, batch):
        raise ValueError(
            f"expected a condition broadcastable to ({batch}, {dim}), got shape {tuple(c.shape)}"
        )
    return c.expand(batch, dim)


class CondConv3d(nn.Module):
    """3D conditional convolution with ``num_experts`` expert kernels and input + condition routing.

    For a sample ``x_b`` with condition ``c_b`` the routing weights are
    ``r_b = sigmoid(MLP([GAP(x_b), c_b]))`` in ``(0, 1)^K`` (sigmoid as in CondConv, not softmax, so
    several experts can be active at once) and the output is
    ``y_b = conv3d(x_b, sum_k r_bk W_k) + sum_k r_bk b_k``.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        kernel_size: cubic kernel size.
        stride: convolution stride.
        padding: zero padding; ``None`` gives "same" padding ``kernel_size // 2``.
        num_experts: number of expert kernels ``K``.
        cond_dim: size of the condition vector (1 for the direction ``o``).
        routing_hidden: hidden units of the routing MLP (default ``max(8, C_in)``).
        bias: learn a per-expert bias.
        mode: ``"grouped"`` (mix the kernels, then one grouped convolution with ``groups=B``),
            ``"experts"`` (convolve with all ``K`` experts stacked as ``K * C_out`` output channels,
            then mix the outputs; exact as well, since convolution is linear in the kernel, and
            faster on CPU when ``C_out`` is small and not a multiple of 8, e.g. a 3-channel field
            head) or ``"auto"`` (``"grouped"`` when ``C_out`` is a multiple of 8).

    Shapes:
        ``forward(x: (B, C_in, H, W, D), condition: (B,) | (B, cond_dim) | scalar)``
        -> ``(B, C_out, H', W', D')``.

    Example:
        >>> conv = CondConv3d(2, 4, num_experts=3)
        >>> conv(torch.randn(2, 2, 8, 8, 8), torch.tensor([-1.0, 1.0])).shape
        torch.Size([2, 4, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        num_experts: int = 4,
        cond_dim: int = 1,
        routing_hidden: int | None = None,
        bias: bool = True,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"expected num_experts >= 1, got {num_experts}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.num_experts = num_experts
        self.cond_dim = cond_dim
        if mode not in ("auto", "grouped", "experts"):
            raise ValueError(f"expected mode 'auto', 'grouped' or 'experts', got {mode!r}")
        if mode == "auto":
            mode = "grouped" if out_channels % 8 == 0 else "experts"
        self.mode = mode
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, k, k, k))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        hidden = routing_hidden or max(8, in_channels)
        self.routing = nn.Sequential(
            nn.Linear(in_channels + cond_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_experts),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like ``nn.Conv3d`` (Kaiming uniform, fan-in bias bound)."""
        for k in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size**3
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def zero_init_(self, std: float = 0.0) -> CondConv3d:
        """Set all expert kernels to ``N(0, std)`` and biases to zero (near-identity heads)."""
        with torch.no_grad():
            if std > 0:
                self.weight.normal_(0.0, std)
            else:
                self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()
        return self

    def routing_weights(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        """Per-sample expert weights ``(B, K)`` from ``[GAP(x), condition]``."""
        b = x.shape[0]
        pooled = x.mean(dim=(2, 3, 4))
        c = condition_vector(condition, b, self.cond_dim, pooled)
        return torch.sigmoid(self.routing(torch.cat([pooled, c], dim=1)))

    def mixed_kernels(self, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels ``(B, C_out, C_in, k, k, k)`` and biases ``(B, C_out)``.

        Args:
            routing: expert weights ``(B, K)``.
        """
        w = torch.einsum("bk,koi...->boi...", routing, self.weight.to(routing.dtype))
        bias = None if self.bias is None else routing @ self.bias.to(routing.dtype)
        return w, bias

    def forward(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, H, W, D), got shape {tuple(x.shape)}"
            )
        b = x.shape[0]
        routing = self.routing_weights(x, condition)
        k = self.kernel_size
        if self.mode == "experts":
            out = F.conv3d(
                x,
                self.weight.to(x.dtype).reshape(-1, self.in_channels, k, k, k),
                bias=None if self.bias is None else self.bias.to(x.dtype).reshape(-1),
                stride=self.stride,
                padding=self.padding,
            )
            out = out.reshape(b, self.num_experts, self.out_channels, *out.shape[2:])
            r = routing.to(x.dtype).reshape(b, self.num_experts, 1, 1, 1, 1)
            return (out * r).sum(dim=1)
        w, bias = self.mixed_kernels(routing)
        w = w.to(x.dtype)
        out = F.conv3d(
            x.reshape(1, b * self.in_channels, *x.shape[2:]),
            w.reshape(b * self.out_channels, self.in_channels, k, k, k),
            bias=None if bias is None else bias.to(x.dtype).reshape(-1),
            stride=self.stride,
            padding=self.padding,
            groups=b,
        )
        return out.reshape(b, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, num_experts={self.num_experts}, "
            f"cond_dim={self.cond_dim}, mode={self.mode!r}"
        )
