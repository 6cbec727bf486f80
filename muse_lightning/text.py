"""Sequence classifiers of MUSE blocks: token ids (``MUSETextNet``) or float features (``MUSESequenceNet``)."""
from __future__ import annotations

from typing import Literal, get_args

import torch
from timm.layers import LayerNorm, trunc_normal_
from torch import nn

from .block import MUSEBlock
from .options import MixerOptions

__all__ = ["GLOBAL_POOLS", "GlobalPool", "MUSESequenceNet", "MUSETextNet"]

# timm's names for a global pooling (``SelectAdaptivePool2d``'s pool types): the mean of the real tokens, their
# maximum per channel, or both side by side (the head twice as wide).
GlobalPool = Literal["avg", "max", "catavgmax"]
GLOBAL_POOLS: tuple[str, ...] = get_args(GlobalPool)


class _MUSEEncoderNet(nn.Module):
    """Learned positions + ``MUSEBlock``s (1-D) + masked global pooling + linear head, over an input embedding
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
            mixer: MixerOptions,
            parallel: bool,
            drop_rate: float,
            drop_path_rate: float,
            global_pool: GlobalPool = "avg",
    ) -> None:
        super().__init__()
        mixer = MixerOptions.of(mixer)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if mixer.conv_layout == "2d":
            raise ValueError("conv_layout='2d' needs a patch grid; a sequence's tokens are 1-D (conv_layout='1d' or None)")
        self.max_length = max_length
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, dim))
        self.drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            MUSEBlock(
                dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path_rate * i / max(depth - 1, 1),
                mixer=mixer, parallel=parallel,
            )
            for i in range(depth)
        )
        self.norm = LayerNorm(dim)
        self.global_pool = global_pool
        self.head = nn.Linear(2 * dim if global_pool == "catavgmax" else dim, num_classes)
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
        pooled = []
        if self.global_pool in ("avg", "catavgmax"):
            keep = (~key_padding_mask).unsqueeze(-1).to(x.dtype)
            pooled.append((x * keep).sum(1) / keep.sum(1).clamp(min=1.0))
        if self.global_pool in ("max", "catavgmax"):
            top = x.masked_fill(key_padding_mask.unsqueeze(-1), float("-inf")).amax(1)
            pooled.append(top.masked_fill(key_padding_mask.all(1, keepdim=True), 0.0))  # no real token: 0, as avg
        return self.head(self.drop(torch.cat(pooled, -1)))


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
            mixer: MixerOptions = MixerOptions(),
            parallel: bool = True,
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.1,
            pad_id: int = 0,
            ngram_buckets: int = 0,
            global_pool: GlobalPool = "avg",
    ) -> None:
        """
        Args:
            num_classes: Output classes.
            vocab_size: Token ids are in ``[0, vocab_size)``; 257 fits ``ByteTokenizer``.
            max_length: Longest sequence (size of the position table).
            dim, depth, num_heads, mlp_ratio: Transformer width, blocks, heads, MLP ratio.
            mixer: The MUSE convolution's options (``MixerOptions``; 1-D).
            parallel: MUSE's parallel block (mixer and MLP on one norm), or sequential blocks.
            drop_rate: Dropout on embeddings and on the pooled features.
            drop_path_rate: Stochastic depth, rising linearly to this rate in the last block.
            pad_id: Padding token id.
            ngram_buckets: With more than ``vocab_size`` buckets, a linear bag of token 1- and 2-grams beside the
                encoder (fastText's, as a wide path): each token and each pair of neighbouring tokens (hashed into
                the buckets past the vocabulary) adds its learnt logits, weighed by ``1 / sqrt(n)`` for a
                sequence of ``n`` of them, to the encoder's. 0: the encoder alone.
            global_pool: How the tokens become one vector (``GLOBAL_POOLS``, timm's names): ``"avg"`` their mean,
                ``"max"`` their maximum per channel, ``"catavgmax"`` both; padding is left out.
        """
        super().__init__(
            num_classes, max_length, dim, depth, num_heads, mlp_ratio, mixer, parallel, drop_rate, drop_path_rate,
            global_pool,
        )
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        trunc_normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        if ngram_buckets and ngram_buckets <= vocab_size:
            raise ValueError(f"ngram_buckets must exceed vocab_size={vocab_size} (or be 0), got {ngram_buckets}")
        self.ngram_buckets = ngram_buckets
        # The last row is the padding n-gram's, left out of every sum; the table starts at zero (a silent path).
        self.ngrams = nn.EmbeddingBag(ngram_buckets + 1, num_classes, mode="sum", padding_idx=ngram_buckets) \
            if ngram_buckets else None
        if self.ngrams is not None:
            nn.init.zeros_(self.ngrams.weight)

    def _ngram_logits(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """The bag of 1- and 2-grams' logits ``(B, num_classes)``; n-grams touching padding count for nothing."""
        vocab, buckets = self.embed.num_embeddings, self.ngram_buckets
        real = ~key_padding_mask
        pairs = vocab + (input_ids[:, :-1] * vocab + input_ids[:, 1:]) % (buckets - vocab)
        ids = torch.cat([input_ids, pairs], 1)
        kept = torch.cat([real, real[:, :-1] & real[:, 1:]], 1)
        ids = ids.masked_fill(~kept, buckets)
        weights = kept.to(self.ngrams.weight.dtype) / kept.sum(1, keepdim=True).clamp(min=1).sqrt()
        return self.ngrams(ids, per_sample_weights=weights)

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
        logits = self._classify(self.embed(input_ids), key_padding_mask)
        return logits if self.ngrams is None else logits + self._ngram_logits(input_ids, key_padding_mask)


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
            mixer: MixerOptions = MixerOptions(),
            parallel: bool = True,
            drop_rate: float = 0.1,
            drop_path_rate: float = 0.1,
            max_tokens: int | None = None,
            stem_kernel: int | None = None,
            normalize: bool = False,
            global_pool: GlobalPool = "avg",
    ) -> None:
        """
        Args:
            num_classes: Output classes.
            in_features: Features per step.
            max_length: Longest sequence (size of the position table).
            dim, depth, num_heads, mlp_ratio, mixer, parallel, drop_rate, drop_path_rate, global_pool: As
                ``MUSETextNet``.
            max_tokens: Tokens the stem makes of a ``max_length`` sequence: it strides by ``s = ceil(max_length /
                max_tokens)`` steps, so a sequence of ``L`` steps becomes ``ceil(L / s)`` tokens (patches) for the
                blocks to mix. None: one token a step.
            stem_kernel: Steps each token embeds, an odd int at least the stride, centred on the token's first
                step and read as zeros past either end of the sequence; None: ``2 s - 1`` (overlapping windows,
                one step alone, a linear embedding, when ``s = 1``).
            normalize: Centre and scale each series, per feature, over its own real steps (the usual
                z-normalisation of time-series classification) before the stem.
        """
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        stride = 1 if max_tokens is None else -(-max_length // max_tokens)
        stem_kernel = 2 * stride - 1 if stem_kernel is None else stem_kernel
        if not (isinstance(stem_kernel, int) and stem_kernel >= stride and stem_kernel % 2 == 1):
            raise ValueError(
                f"stem_kernel must be an odd int of at least the stem's stride ({stride} steps), got {stem_kernel!r}"
            )
        super().__init__(
            num_classes, -(-max_length // stride), dim, depth, num_heads, mlp_ratio, mixer, parallel, drop_rate,
            drop_path_rate, global_pool,
        )
        self.in_features, self.max_steps, self.stride = in_features, max_length, stride
        self.normalize = normalize
        self.embed = nn.Conv1d(in_features, dim, stem_kernel, stride=stride, padding=stem_kernel // 2)
        trunc_normal_(self.embed.weight, std=0.02)
        nn.init.zeros_(self.embed.bias)

    def forward(self, features: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)``; ``key_padding_mask`` ``(B, N)`` is ``True`` on padded steps (none if None)."""
        if features.dim() != 3 or features.shape[-1] != self.in_features or not features.is_floating_point():
            raise ValueError(
                f"features must be a (B, N, {self.in_features}) float tensor, got {features.dtype} {tuple(features.shape)}"
            )
        if features.shape[1] > self.max_steps:
            raise ValueError(f"the input has {features.shape[1]} steps, more than max_length={self.max_steps}")
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        # Padded steps enter as zeros, so that whatever the padding held cannot reach the model; the stem's
        # window reads them as the zeros past a sequence's end.
        pad = key_padding_mask.unsqueeze(-1)
        features = features.masked_fill(pad, 0.0)
        if self.normalize:
            steps = (~pad).sum(1, keepdim=True).clamp(min=1)
            mean = features.sum(1, keepdim=True) / steps
            centred = (features - mean).masked_fill(pad, 0.0)
            std = (centred.square().sum(1, keepdim=True) / steps).sqrt()
            features = centred / std.clamp(min=1e-5)
        # Token j starts at step j * stride: it is padding where that step is, so a sequence of L steps
        # keeps ceil(L / stride) tokens, as it would alone.
        tokens = self.embed(features.transpose(1, 2)).transpose(1, 2)
        return self._classify(tokens, key_padding_mask[:, :: self.stride])
