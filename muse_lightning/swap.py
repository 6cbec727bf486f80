"""Swap MUSE into an existing timm model, keeping the function it computes."""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal, overload

from torch import nn

from .adapters import ATTENTION_ADAPTERS, NOT_ATTENTION, AttentionAdapter, ancestors_of
from .attention import MUSEAttention
from .branch import MUSEBranch
from .options import MixerOptions
from .taps import Split, attach, tap_role, widths
from .vit import follow_token_layout

__all__ = ["swap_attention"]

_logger = logging.getLogger(__name__)

_ATTENTION_NAME = re.compile(r"Attention|Attn")


@overload
def swap_attention(
        model: nn.Module, mixer: MixerOptions | Mapping[str, Any] = ..., *, return_names: Literal[False] = ...,
        strict: bool = ...,
) -> nn.Module: ...


@overload
def swap_attention(
        model: nn.Module, mixer: MixerOptions | Mapping[str, Any] = ..., *, return_names: Literal[True],
        strict: bool = ...,
) -> tuple[nn.Module, list[str]]: ...


def swap_attention(
        model: nn.Module, mixer: MixerOptions | Mapping[str, Any] = MixerOptions(), *, return_names: bool = False,
        strict: bool = False,
) -> nn.Module | tuple[nn.Module, list[str]]:
    """Add MUSE's convolution branch to every attention in ``model`` that has an adapter.

    Each attention keeps its own forward, weights and state_dict keys (RoPE, relative position
    bias, windows, talking heads stay what they are); its value projection also feeds a
    ``MUSEBranch`` (registered as ``<attention>.muse``) whose convolution over the attention's
    token layout is added to the output projection. The branch starts silent (its output
    projection, or with ``conv_proj="shared"`` its kernels, at zero), so the swapped model computes
    the same function and fine-tuning starts from its accuracy. Adapters are looked up by exact
    class in ``ATTENTION_ADAPTERS`` (``register_attention_adapter`` adds one; a ``transformers`` model
    brings in ``muse_lightning.hf``'s). A timm ``VisionTransformer`` becomes a ``MUSEVisionTransformer``,
    an ``Eva`` a ``MUSEEva`` and a ``NaFlexVit`` a ``MUSENaFlexVit``: they follow dynamic image sizes and
    patch dropout; these and BEiT, ViT-relpos and the Swins also follow ``set_input_size``.

    Attentions left alone (pooling and class-attention heads, attention classes without an adapter)
    are named in a warning; ``strict=True`` makes them an error.

    Args:
        model: A timm model, or a module holding one (changed in place and returned).
        mixer: MUSE's options (``MixerOptions``, or a mapping of its fields): kernel sizes, static or dynamic
            kernels, the projection, the layout (None: the attention's own, 2-D where the tokens are a grid); the
            rest (widths, heads, prefix tokens, grid) is the attention's.
        return_names: Also return the names of the swapped attention modules.
        strict: Raise instead of warning when an attention is left alone.
    """
    mixer = _checked(MixerOptions.of(mixer))
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        from . import hf  # noqa: F401  (registers the Hugging Face adapters; transformers is an optional extra)
    targets, left = [], []
    handled: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in handled):
            continue
        if isinstance(getattr(module, "muse", None), MUSEBranch):
            raise ValueError(f"{name} already has a MUSE branch (swap_attention was run on this model before)")
        entry = ATTENTION_ADAPTERS.get(type(module))
        if entry is None and isinstance(module, (MUSEAttention, MUSEBranch)):
            continue
        if entry is None:
            if _looks_like_attention(module):
                left.append(f"{name} ({type(module).__name__}: no adapter; see register_attention_adapter)")
                handled.append(name)
            continue
        handled.append(name)
        reason = entry if isinstance(entry, str) else entry.left_alone and entry.left_alone(module)
        if reason:
            left.append(f"{name} ({type(module).__name__}: {reason})")
        else:
            targets.append((name, module, entry))
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no attention module that swap_attention has an adapter for"
            + (f"; left alone: {left}" if left else "")
        )
    if left:
        message = f"swap_attention left {len(left)} attention modules without MUSE: " + "; ".join(left)
        if strict:
            raise ValueError(message + " (strict=True)")
        warnings.warn(message, stacklevel=2)
    plans = []  # every branch built (and every check passed) before the model changes
    for name, module, adapter in targets:
        ancestors = ancestors_of(model, name)
        plans.append((module, adapter, ancestors, *_branch_for(name, module, adapter, ancestors, mixer)))
    for attn, adapter, ancestors, branch, values, split, output in plans:
        attn.muse = branch
        if adapter.prepare is not None:
            adapter.prepare(attn, ancestors)
        attach(values, split, output, branch)
        if adapter.attention_class is not None:
            attn.__class__ = adapter.attention_class
    for m in list(model.modules()):
        follow_token_layout(m)
    names = [name for name, _, _ in targets]
    _logger.info("swap_attention: MUSE added to %d attention modules: %s", len(names), names)
    return (model, names) if return_names else model


def _looks_like_attention(module: nn.Module) -> bool:
    """A module named like an attention, with weights, that holds no attention ``swap_attention`` knows (then it
    is a block holding one)."""
    return (
        type(module) not in NOT_ATTENTION
        and bool(_ATTENTION_NAME.search(type(module).__name__))
        and any(True for _ in module.parameters())
        and not any(type(m) in ATTENTION_ADAPTERS for m in module.modules())
    )


def _checked(mixer: MixerOptions) -> MixerOptions:
    """``mixer``, if a swap can start silent with it."""
    if mixer.conv_type == "none":
        raise ValueError("conv_type='none' would swap attention for attention; use 'static' or 'dynamic'")
    if mixer.conv_proj == "shared" and mixer.conv_type == "dynamic":
        raise ValueError(
            "conv_proj='shared' with conv_type='dynamic' cannot start silent (dynamic kernels sum to one): "
            "use conv_proj='separate' to keep the model's function"
        )
    return mixer


_HEADS = ("num_heads", "heads", "num_attention_heads", "n_heads")


def _num_heads(attn: nn.Module) -> int:
    """The attention's head count (its own attribute, or its inner attention's), for the dynamic kernels' heads."""
    for m in (attn, *attn.children()):
        heads = next((getattr(m, a) for a in _HEADS if isinstance(getattr(m, a, None), int)), None)
        if heads:
            return heads
    return 1


def _find(attn: nn.Module, path: str) -> list[nn.Module]:
    """The layers at ``path`` (dotted) in ``attn``: one, or each of a ``ModuleList``'s; none if absent."""
    try:
        found = attn.get_submodule(path)
    except AttributeError:
        return []
    return list(found) if isinstance(found, nn.ModuleList) else [found]


def _branch_for(
        name: str, attn: nn.Module, adapter: AttentionAdapter, ancestors: list[nn.Module], mixer: MixerOptions,
) -> tuple[MUSEBranch, list[nn.Module], Split, nn.Module]:
    """``attn``'s silent ``MUSEBranch``, its value layers and split, and its output layer (nothing changed yet)."""
    found = [
        (layers, split) for path, split in adapter.values
        if (layers := _find(attn, path)) and all(tap_role(layer, output=False) for layer in layers)
    ]
    outputs = (adapter.output,) if isinstance(adapter.output, str) else adapter.output
    # The first pointwise projection among the candidates, else the first layer the branch can join the input of.
    present = [layers[0] for path in outputs if len(layers := _find(attn, path)) == 1]
    output = next((layer for role in ("output", "input") for layer in present
                   if tap_role(layer, output=True) == role), None)
    if not found or output is None:
        raise TypeError(
            f"{name} ({type(attn).__name__}) has no value layer among {[a for a, _ in adapter.values]} or no "
            f"output layer among {list(outputs)} (pointwise: nn.Linear or 1 x 1 nn.Conv2d, with its norm): its "
            "adapter does not fit it"
        )
    values, split = found[0]
    value_width = widths(values[0])[1]
    split = (1, slice(value_width - value_width // split, None)) if isinstance(split, int) else split(attn)
    groups, channels = split
    value_dim = len(values) * groups * len(range(value_width // groups)[channels])
    output_in, output_out = widths(output) or (value_dim, value_dim)
    if tap_role(output, output=True) == "input":  # the branch joins the output layer's input
        output_out = output_in
    layout = adapter.layout(attn, ancestors)
    conv_layout = mixer.layout_or(layout.layout)
    if conv_layout == "2d" and layout.layout != "2d":
        raise ValueError(
            f"conv_layout='2d' needs a token grid, but {name} ({type(attn).__name__}) attends over a sequence here "
            "(a ViT-style model gives its patch grid)"
        )
    if mixer.conv_proj == "shared" and value_dim != output_in:
        raise ValueError(
            f"conv_proj='shared' adds the convolution to the attention output, but {name}'s values are {value_dim} "
            f"wide and its output projection takes {output_in}: use conv_proj='separate'"
        )
    weight = next(values[0].parameters())
    branch = MUSEBranch(
        value_dim, output_out, num_heads=_num_heads(attn), mixer=mixer, layout=layout, num_value_parts=len(values),
        device=weight.device, dtype=weight.dtype,
    )
    branch.silence()
    return branch, values, split, output
