"""The seed's MUSE design, kept as a reference: its state_dict layout and its output.

The project started from a reference ``MUSEAttention`` (see ``shared/seed``). This module rebuilds
that design with the same parameter names, so that seed checkpoints can be checked against
``MUSEAttention.from_seed`` and the seed's cost can be measured. It is not meant for training: it
materialises the N x N attention matrix, runs one depthwise + pointwise convolution per kernel
size, and supports no masks. Its output is the seed's first forward pass (the seed replaced its
gate with ``softmax(gate)`` on every call; here the softmax is applied without replacing it).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeedMUSEAttention"]


class _SeedConv(nn.Module):
    """Depthwise (absent for kernel size 1) then pointwise convolution, channels first."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.depth_conv = (
            nn.Identity() if kernel_size == 1
            else nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        )
        self.pointwise_conv = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depth_conv(x))


class SeedMUSEAttention(nn.Module):
    """The seed's ``MUSEAttention(d_model, d_k, d_v, h, dropout)``: kernel sizes (1, 3, 5)."""

    def __init__(self, d_model: int, d_k: int, d_v: int, h: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.h, self.d_k, self.d_v = h, d_k, d_v
        self.dropout = nn.Dropout(dropout)
        self.fc_q = nn.Linear(d_model, h * d_k)
        self.fc_k = nn.Linear(d_model, h * d_k)
        self.fc_v = nn.Linear(d_model, h * d_v)
        self.fc_o = nn.Linear(h * d_v, d_model)
        self.conv1 = _SeedConv(h * d_v, d_model, 1)
        self.conv3 = _SeedConv(h * d_v, d_model, 3)
        self.conv5 = _SeedConv(h * d_v, d_model, 5)
        self.dy_paras = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention on ``x`` of shape ``(B, N, d_model)``."""
        B, N, _ = x.shape
        q = self.fc_q(x).view(B, N, self.h, self.d_k).transpose(1, 2)
        k = self.fc_k(x).view(B, N, self.h, self.d_k).transpose(1, 2)
        v = self.fc_v(x).view(B, N, self.h, self.d_v).transpose(1, 2)
        weights = self.dropout((q @ k.transpose(-2, -1) * self.d_k ** -0.5).softmax(-1))
        attn = (weights @ v).transpose(1, 2).reshape(B, N, self.h * self.d_v)
        v_channels = v.transpose(2, 3).reshape(B, self.h * self.d_v, N)
        g = self.dy_paras.softmax(0)
        conv = g[0] * self.conv1(v_channels) + g[1] * self.conv3(v_channels) + g[2] * self.conv5(v_channels)
        return self.fc_o(attn) + conv.transpose(1, 2)
