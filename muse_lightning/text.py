"""Sequence classifiers of MUSE blocks: token ids (``MUSETextNet``) or float features (``MUSESequenceNet``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm, trunc_normal_
from torch import nn

from .attention import ConvProj
from .block import MUSEBlock
from .conv import ConvType

__all__ = ["MUSESequenceNet", "MUSETextNet"]


class _MUSEEncoderNet(nn.Module):
    """Learned positions + ``MUSEBlock``s (1-D) + masked mean pooling + linear head, over an input embedding
    that the subclass supplies. Padding is excluded from attention, never read by the convolutions and left
    out of the pooling, so a sequence's logits do not depend on how much it was padded."""

    def __init__(
            self,
            num_classes: int,
            max_length: int,
            dim: int,
            depth: int,
            num_heads: int,
            mlp_ratio: float,
            kernel_sizes: Sequence[int] | None,
            conv_type: ConvType,
            conv_proj: ConvProj,
            parallel: bool,
            drop_rate: float,
            drop_path_rate: float,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, dim))
        self.drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            MUSEBlock(
                dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path_rate * i / max(depth - 1, 1),
                kernel_sizes=kernel_sizes, conv_type=conv_type, conv_proj=conv_proj, parallel=parallel,
            )
            for i in range(depth)
        )
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW should not decay (timm's convention)."""
        return {"pos_embed"}

    def _check_length(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(f"the input has {length} steps (tokens), more than max_length={self.max_length}")

    def _classify(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """Logits for embedded inputs ``x`` ``(B, N, dim)``; ``key_padding_mask`` is ``True`` on padding."""
        x = self.drop(x + self.pos_embed[:, : x.shape[1]])
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask)
        x = self.norm(x)
        keep = (~key_padding_mask).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(self.drop(pooled))


class MUSETextNet(_MUSEEncoderNet):
    """Token embedding + the MUSE encoder; padding is ``input_ids == pad_id`` unless a mask is given."""

    def __init__(
            self,
            num_classes: int,
            vocab_size: int = 257,
            max_length: int = 256,
            dim: int = 128,
            depth: int = 4,
            num_heads: int = 4,
            mlp_ratio: float = 4.0,
            kernel_sizes: Sequence[int] | None = None,
            conv_type: ConvType = "static",
            conv_proj: ConvProj = "separate",
            parallel: bool = True,
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.1,
            pad_id: int = 0,
    ) -> None:
        """
        Args:
            num_classes: Output classes.
            vocab_size: Token ids are in ``[0, vocab_size)``; 257 fits ``ByteTokenizer``.
            max_length: Longest sequence (size of the position table).
            dim, depth, num_heads, mlp_ratio: Transformer width, blocks, heads, MLP ratio.
            kernel_sizes, conv_type, conv_proj: The MUSE convolution (see ``MUSEAttention``).
            parallel: MUSE's parallel block (mixer and MLP on one norm), or sequential blocks.
            drop_rate: Dropout on embeddings and on the pooled features.
            drop_path_rate: Stochastic depth, rising linearly to this rate in the last block.
            pad_id: Padding token id.
        """
        super().__init__(
            num_classes, max_length, dim, depth, num_heads, mlp_ratio, kernel_sizes, conv_type, conv_proj, parallel,
            drop_rate, drop_path_rate,
        )
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        trunc_normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for token ids ``(B, N)``."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (B, N) long tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        self._check_length(input_ids.shape[1])
        if not torch.compiler.is_compiling() and input_ids.device.type != "meta":  # data-dependent: eager, real ids
            vocab_size = self.embed.num_embeddings
            outside = (input_ids < 0) | (input_ids >= vocab_size)
            if outside.any():
                raise ValueError(
                    f"input_ids holds token ids outside the vocabulary [0, {vocab_size}): e.g. "
                    f"{input_ids[outside][:5].tolist()}; the tokenizer and the model's vocab_size disagree"
                )
        if key_padding_mask is None:
            key_padding_mask = input_ids == self.pad_id
        return self._classify(self.embed(input_ids), key_padding_mask)


class MUSESequenceNet(_MUSEEncoderNet):
    """Float features ``(B, N, in_features)`` (time series, audio frames, sensor readings): a linear
    embedding + the MUSE encoder; padded steps are given by ``key_padding_mask``."""

    def __init__(
            self,
            num_classes: int,
            in_features: int,
            max_length: int = 512,
            dim: int = 128,
            depth: int = 4,
            num_heads: int = 4,
            mlp_ratio: float = 4.0,
            kernel_sizes: Sequence[int] | None = None,
            conv_type: ConvType = "static",
            conv_proj: ConvProj = "separate",
            parallel: bool = True,
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.1,
    ) -> None:
        """
        Args:
            num_classes: Output classes.
            in_features: Features per step.
            max_length: Longest sequence (size of the position table).
            dim, depth, num_heads, mlp_ratio, kernel_sizes, conv_type, conv_proj, parallel, drop_rate,
                drop_path_rate: As ``MUSETextNet``.
        """
        super().__init__(
            num_classes, max_length, dim, depth, num_heads, mlp_ratio, kernel_sizes, conv_type, conv_proj, parallel,
            drop_rate, drop_path_rate,
        )
        self.in_features = in_features
        self.embed = nn.Linear(in_features, dim)
        trunc_normal_(self.embed.weight, std=0.02)
        nn.init.zeros_(self.embed.bias)

    def forward(self, features: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)``; ``key_padding_mask`` ``(B, N)`` is ``True`` on padded steps (none if None)."""
        if features.dim() != 3 or features.shape[-1] != self.in_features or not features.is_floating_point():
            raise ValueError(
                f"features must be a (B, N, {self.in_features}) float tensor, got {features.dtype} {tuple(features.shape)}"
            )
        self._check_length(features.shape[1])
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        # Padded steps enter as zeros, so that whatever the padding held cannot reach the model.
        features = features.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        return self._classify(self.embed(features), key_padding_mask)
