"""MUSE token mixer: self-attention and a multi-scale convolution over one shared value projection."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

from ._fx import is_tracing
from .branch import _NO_SCRIPT, TokenConv, TokenLayout
from .options import MixerOptions

__all__ = ["MUSEAttention"]


def _restrict(mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """Intersect an SDPA mask (bool ``True`` = attend, or additive float) with a bool ``allowed``."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


class MUSEAttention(TokenConv, nn.Module):
    """MUSE parallel multi-scale attention, a drop-in for timm's ``Attention``.

    ``y = proj(Attention(q, k, v)) + conv_proj(Conv(v))`` where ``v`` is the one value projection
    both branches read (the paper's shared projection) and ``Conv`` is a gated multi-scale
    depthwise (``"static"``) or dynamic convolution over the tokens.
    """

    fused_attn: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: int | None = None,
            dim_out: int | None = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            norm_layer: type[nn.Module] | None = None,
            mixer: MixerOptions = MixerOptions(),
            num_prefix_tokens: int = 0,
            grid_size: tuple[int, int] | None = None,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            dim: Token width C.
            num_heads: Attention heads (also the dynamic convolution's kernel heads).
            attn_head_dim: Width of each head; ``dim // num_heads`` if None.
            dim_out: Output width; ``dim`` if None.
            qkv_bias: Bias in the query, key and value projection.
            qk_norm: Normalise queries and keys with ``norm_layer``.
            scale_norm: Normalise the attention output with ``norm_layer`` before projecting it.
            proj_bias: Bias in the output projection.
            gated: Sigmoid gate on the attention output, as timm's ``Attention(gated=True)``.
            attn_drop: Dropout on the attention weights.
            proj_drop: Dropout on the output.
            norm_layer: Normalisation layer for ``qk_norm`` / ``scale_norm``.
            mixer: The convolution's options (``MixerOptions``: kernel sizes, static or dynamic kernels or none,
                the projection, the layout, 1-D by default).
            num_prefix_tokens: Leading tokens (class, registers) that go through attention only:
                the convolution neither reads nor writes them.
            grid_size: Default ``(H, W)`` token grid of the 2-D layout; ``forward(grid_size=...)``
                overrides it; with neither, a square grid is inferred. Tokens that do not fill the grid are an error.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or pass attn_head_dim")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.fused_attn = use_fused_attn()
        dim_out = dim_out or dim

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        mixer = MixerOptions.of(mixer)
        layout = TokenLayout(mixer.layout_or("1d"), num_prefix_tokens, grid_size)
        self._build_conv(self.attn_dim, dim_out, num_heads, mixer, layout, dd)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: linear weights trunc normal (std 0.02), zero biases; conv branch reset."""
        for m in (self.qkv, self.gate, self.proj, self.conv_proj):
            if m is not None:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.conv is not None:
            self.conv.reset_parameters()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
            key_padding_mask: torch.Tensor | None = None,
            grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: Tokens ``(B, N, C)``.
            attn_mask: Attention-only mask broadcastable to ``(B, num_heads, N, N)``: bool
                (``True`` = may attend) or additive float. The convolution does not read it: give
                padding as ``key_padding_mask``.
            is_causal: Make attention and convolution causal (in a ``torch.fx`` graph, attention only).
            key_padding_mask: Bool ``(B, N)``, ``True`` marks padding (``nn.MultiheadAttention``'s
                convention). Padding is excluded from attention, never read by the convolution, and
                its output is zero.
            grid_size: ``(H, W)`` of the patch grid for the 2-D layout (see the constructor).
        """
        B, N, _ = self._check_inputs(x, attn_mask, key_padding_mask)
        conv_kwargs = self._conv_kwargs(N, is_causal, grid_size) if self.conv is not None else {}
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        values = v.reshape(B, N, self.attn_dim)  # shared by both branches
        q, k, v = self.q_norm(q.transpose(1, 2)), self.k_norm(k.transpose(1, 2)), v.transpose(1, 2)

        if is_tracing():  # FX: the masks are graph inputs, handed to SDPA as they come (as timm's Attention)
            mask, causal_attn = attn_mask, is_causal
        else:
            mask = self._attention_mask(attn_mask, key_padding_mask, is_causal, N, q)
            causal_attn = is_causal and mask is None
        if self.fused_attn or is_tracing():
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=causal_attn,
            )
        else:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            if causal_attn:
                mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            attn = self.attn_drop(scores.softmax(dim=-1)) @ v
        attn = self.norm(attn.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            attn = attn * gate

        if self.conv is None:
            out = self.proj(attn)
        else:
            out = self._mix_conv(attn, values, self.proj, key_padding_mask, conv_kwargs)
        if key_padding_mask is not None:
            out = out.masked_fill(key_padding_mask[..., None], 0.0)
        return self.proj_drop(out)

    def __prepare_scriptable__(self) -> nn.Module:
        raise NotImplementedError(_NO_SCRIPT)

    def _check_inputs(
            self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    ) -> torch.Size:
        if is_tracing():
            return x.shape
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, C), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x has {C} channels but the module was built with dim={self.dim}")
        weight_dtype = self.qkv.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x is {x.dtype} but the mixer's weights are {weight_dtype}: cast one to the other "
                f"(module.to({x.dtype})) or run under torch.autocast"
            )
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True marks padding)")
            if key_padding_mask.shape != (B, N):
                raise ValueError(f"key_padding_mask must have shape (B, N) = {(B, N)}, got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
                raise TypeError("attn_mask must be a bool (True = may attend) or floating point tensor")
            target = (B, self.num_heads, N, N)
            if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(attn_mask.shape[::-1], target[::-1])):
                raise ValueError(f"attn_mask must broadcast to (B, num_heads, N, N) = {target}, got {tuple(attn_mask.shape)}")
        return x.shape

    @staticmethod
    def _attention_mask(
            attn_mask: torch.Tensor | None,
            key_padding_mask: torch.Tensor | None,
            is_causal: bool,
            seq_len: int,
            q: torch.Tensor,
    ) -> torch.Tensor | None:
        """One SDPA mask from the three mask arguments, None when ``is_causal`` alone will do.

        Query rows left with no key to attend to (padding under a causal mask, fully padded rows)
        are opened to every key so that they stay finite; their output is discarded.
        """
        if attn_mask is None and key_padding_mask is None:
            return None
        mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        if key_padding_mask is not None:
            mask = _restrict(mask, ~key_padding_mask[:, None, None, :])
        if is_causal:
            mask = _restrict(mask, torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril())
        if mask.dtype == torch.bool:
            return mask | ~mask.any(dim=-1, keepdim=True)
        return mask.masked_fill(torch.isneginf(mask).all(dim=-1, keepdim=True), 0.0)

    @classmethod
    def from_seed(cls, state_dict: Mapping[str, torch.Tensor], num_heads: int, **kwargs) -> MUSEAttention:
        """Build a module from a state_dict of the seed's ``MUSEAttention`` that reproduces its output.

        The seed computes ``fc_o(attn) + sum_i softmax(dy_paras)_i * conv{k_i}(v)`` with one
        depthwise + pointwise convolution per kernel size (``k = 1`` has no depthwise layer). This
        maps it onto ``conv_proj="per_kernel"``, folding the gated pointwise biases into
        ``proj.bias``. ``kwargs`` go to the constructor (e.g. ``attn_drop``).
        """
        sd = dict(state_dict)
        sizes = sorted({int(key.split(".")[0][4:]) for key in sd if key.startswith("conv") and key[4:5].isdigit()})
        required = [f"fc_{n}.{p}" for n in "qkvo" for p in ("weight", "bias")] + ["dy_paras"]
        required += [f"conv{k}.pointwise_conv.{p}" for k in sizes for p in ("weight", "bias")]
        required += [f"conv{k}.depth_conv.{p}" for k in sizes if k > 1 for p in ("weight", "bias")]
        missing, unexpected = sorted(set(required) - set(sd)), sorted(set(sd) - set(required))
        if not sizes or missing or unexpected:
            raise ValueError(f"state_dict is not a seed MUSEAttention state_dict: missing {missing}, unexpected {unexpected}")
        attn_dim, dim = sd["fc_q.weight"].shape
        if sd["fc_v.weight"].shape != (attn_dim, dim) or sd["fc_o.weight"].shape != (dim, attn_dim):
            raise ValueError("from_seed needs d_k == d_v (fc_q, fc_k and fc_v of the same shape)")
        if attn_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the seed's h * d_k ({attn_dim})")
        gates = sd["dy_paras"].softmax(0)
        module = cls(
            dim, num_heads=num_heads, attn_head_dim=attn_dim // num_heads, qkv_bias=True,
            mixer=MixerOptions(tuple(sizes), conv_proj="per_kernel"), **kwargs,
        )
        eye = torch.ones(attn_dim, 1)
        with torch.no_grad():
            module.qkv.weight.copy_(torch.cat([sd[f"fc_{n}.weight"] for n in "qkv"]))
            module.qkv.bias.copy_(torch.cat([sd[f"fc_{n}.bias"] for n in "qkv"]))
            module.proj.weight.copy_(sd["fc_o.weight"])
            pointwise_bias = sum(g * sd[f"conv{k}.pointwise_conv.bias"] for g, k in zip(gates, sizes))
            module.proj.bias.copy_(sd["fc_o.bias"] + pointwise_bias)
            module.conv_proj.weight.copy_(torch.cat([sd[f"conv{k}.pointwise_conv.weight"][..., 0] for k in sizes], dim=1))
            for i, k in enumerate(sizes):
                module.conv.weight[i].copy_(sd[f"conv{k}.depth_conv.weight"][:, 0] if k > 1 else eye)
                module.conv.bias[i].copy_(sd[f"conv{k}.depth_conv.bias"] if k > 1 else torch.zeros(attn_dim))
            if module.conv.gate is not None:
                module.conv.gate.copy_(sd["dy_paras"])
        return module
