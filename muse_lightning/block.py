"""MUSE block: the MUSE mixer and a feed-forward network in parallel on one normalised input."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import Attention, DropPath, LayerNorm, LayerScale, Mlp
from torch import nn

from .attention import MUSEAttention
from .options import MixerOptions

__all__ = ["MUSEBlock"]


def _mixer_class(attn_layer: Callable[..., nn.Module] | None) -> Callable[..., nn.Module]:
    if attn_layer is None or attn_layer is Attention:
        return MUSEAttention
    base = attn_layer.func if isinstance(attn_layer, partial) else attn_layer
    if not (isinstance(base, type) and issubclass(base, MUSEAttention)):
        raise ValueError(f"attn_layer must be MUSEAttention, a subclass or a partial of one, got {attn_layer!r}")
    return attn_layer


class MUSEBlock(nn.Module):
    """The official MUSE parallel block.

    ``y = x + drop_path(ls1(mixer(norm(x)))) + drop_path(ls2(mlp(norm(x))))``: one pre-norm shared
    by the MUSE mixer and the MLP, which run side by side. ``parallel=False`` gives the usual
    sequential pre-norm block instead (``x = x + mixer(norm(x)); y = x + mlp(norm2(x))``), for
    ablations. Arguments follow timm's ``Block``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            init_values: float | None = None,
            drop_path: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = LayerNorm,
            mlp_layer: type[nn.Module] = Mlp,
            mixer: MixerOptions = MixerOptions(),
            num_prefix_tokens: int = 0,
            grid_size: tuple[int, int] | None = None,
            parallel: bool = True,
            attn_layer: Callable[..., nn.Module] | None = None,
            depth: int = 0,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            dim: Token width.
            num_heads: Attention heads.
            mlp_ratio: MLP hidden width over ``dim``.
            init_values: LayerScale init for both branches; None disables LayerScale.
            drop_path: Stochastic depth rate of each branch.
            mixer, num_prefix_tokens, grid_size: The mixer's convolution, see ``MUSEAttention``.
            attn_layer: The mixer class, ``MUSEAttention`` or a subclass / ``functools.partial`` of
                one; None and timm's ``Attention`` (what timm's ``VisionTransformer`` passes as
                ``block_fn`` arguments by default) both mean ``MUSEAttention``.
            parallel: Mixer and MLP side by side on one norm (MUSE), or one after the other.
            depth: Block index; accepted for timm's ``block_fn`` interface, unused.
            Others: as timm's ``Block``.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mixer_cls = _mixer_class(attn_layer)
        self.norm = norm_layer(dim, **dd)
        self.attn = mixer_cls(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
            proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer,
            mixer=mixer, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.norm2 = None if parallel else norm_layer(dim, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
            key_padding_mask: torch.Tensor | None = None,
            grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``x`` of shape ``(B, N, C)``; the other arguments are ``MUSEAttention.forward``'s."""
        y = self.norm(x)
        mixed = self.attn(
            y, attn_mask=attn_mask, is_causal=is_causal, key_padding_mask=key_padding_mask, grid_size=grid_size,
        )
        if self.norm2 is None:
            return x + self.drop_path1(self.ls1(mixed)) + self.drop_path2(self.ls2(self.mlp(y)))
        x = x + self.drop_path1(self.ls1(mixed))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
