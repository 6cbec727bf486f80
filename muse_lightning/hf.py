"""MUSE in Hugging Face ``transformers`` text encoders.

Importing this module registers ``swap_attention`` adapters for the self-attention of the common
encoder families (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ALBERT, DistilBERT, DeBERTa-v2,
ModernBERT); ``swap_attention`` imports it by itself when it meets a ``transformers`` model. The
branch convolves the attention's own value projection over the token sequence (1-D), never reading
the padding the attention mask blocks, and is added to the attention's output projection.
``HFEncoderNet`` is the sequence classifier ``TextClassifier`` builds from a name or folder.

``transformers`` is an optional extra: ``pip install -e ".[text]"``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    import transformers
    from transformers.models.albert import modeling_albert
    from transformers.models.bert import modeling_bert
    from transformers.models.camembert import modeling_camembert
    from transformers.models.deberta_v2 import modeling_deberta_v2
    from transformers.models.distilbert import modeling_distilbert
    from transformers.models.electra import modeling_electra
    from transformers.models.modernbert import modeling_modernbert
    from transformers.models.roberta import modeling_roberta
    from transformers.models.xlm_roberta import modeling_xlm_roberta
except ImportError:  # pragma: no cover - the error names the extra
    raise ImportError("Hugging Face encoders need transformers: pip install -e \".[text]\"") from None

from .adapters import AttentionAdapter, register_attention_adapter, sequence
from .branch import masks_layout
from .options import MixerOptions
from .swap import swap_attention

__all__ = ["HF_ATTENTIONS", "HFEncoderNet"]


class _ReadsHFMask:
    """A ``transformers`` attention that hands its attention mask to its MUSE branch first (keys blocked for
    every query are padding, never convolved). ``_mask_index``: where ``attention_mask`` sits among the
    forward's positional arguments; ``_multiplicative``: the mask is 1 / 0 (DeBERTa) rather than additive."""

    _mask_index: int
    _multiplicative: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attention_mask", args[self._mask_index] if len(args) > self._mask_index else None)
        inner = getattr(self, "self", self)  # BERT-style: the causal flag sits on the inner self-attention
        causal = bool(getattr(inner, "is_causal", False))
        self.muse.see(masks_layout(_sdpa_mask(mask, self._multiplicative), causal))
        return super().forward(*args, **kwargs)


def _sdpa_mask(mask: torch.Tensor | None, multiplicative: bool) -> torch.Tensor | None:
    """``mask`` as SDPA reads it (bool, ``True`` = may attend, or additive float), from the forms ``transformers``
    hands its attentions: 4-D bool or additive, a ``(B, N)`` padding mask of ones and zeros (flash attention),
    or DeBERTa's multiplicative one."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"MUSE reads attention masks as tensors, got {type(mask).__name__}: load the encoder with "
            "attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    return mask.bool() if multiplicative or mask.dtype != torch.bool and not mask.is_floating_point() else mask


def _cross_attention(attn: nn.Module) -> str | None:
    if getattr(attn, "is_cross_attention", False):
        return "cross attention: its values are the encoder's tokens, not this sequence's"
    return None


# (attention class, value layer, output layer, position of attention_mask in its forward, multiplicative mask)
HF_ATTENTIONS: list[tuple[type[nn.Module], str, str, int, bool]] = [
    *((cls, "self.value", "output.dense", 1, False) for cls in (
        modeling_bert.BertAttention, modeling_roberta.RobertaAttention, modeling_xlm_roberta.XLMRobertaAttention,
        modeling_camembert.CamembertAttention, modeling_electra.ElectraAttention,
    )),
    (modeling_albert.AlbertAttention, "value", "dense", 1, False),
    (modeling_distilbert.DistilBertSelfAttention, "v_lin", "out_lin", 1, False),
    (modeling_deberta_v2.DebertaV2Attention, "self.value_proj", "output.dense", 1, True),
    (modeling_modernbert.ModernBertAttention, "Wqkv", "Wo", 2, False),
]

for _cls, _values, _output, _index, _multiplicative in HF_ATTENTIONS:
    _name = f"MaskReading{_cls.__name__}"
    globals()[_name] = _reading = type(_name, (_ReadsHFMask, _cls), {
        "_mask_index": _index, "_multiplicative": _multiplicative, "__module__": __name__,
        "__doc__": f"{_cls.__name__} that hands its attention mask to its MUSE branch first.",
    })
    register_attention_adapter(_cls, AttentionAdapter(
        sequence, values=((_values, 3 if _values == "Wqkv" else 1),), output=_output,
        left_alone=_cross_attention, attention_class=_reading,
    ))


class HFEncoderNet(nn.Module):
    """A ``transformers`` encoder with a sequence-classification head, MUSE swapped into its attention.

    Built from a model name or a local folder: its pretrained weights (``from_pretrained``), or with
    ``pretrained=False`` its config alone (random weights: nothing to download beyond the config).
    """

    def __init__(
            self,
            encoder: str,
            num_classes: int,
            pretrained: bool = True,
            swap: bool = True,
            mixer: MixerOptions = MixerOptions(),
            pad_id: int = 0,
    ) -> None:
        """
        Args:
            encoder: A ``transformers`` model name or folder (``config.json``, weights).
            num_classes: Output classes (the head is new, sized to them).
            pretrained: Load the encoder's weights; False builds it from its config with random weights.
            swap: Add MUSE's convolution branch to its self-attention (``swap_attention``).
            mixer: MUSE's options for the swap (``MixerOptions``).
            pad_id: Padding token id: padding is ``input_ids == pad_id`` unless a mask is given.
        """
        super().__init__()
        auto = transformers.AutoModelForSequenceClassification
        if pretrained:
            self.model = auto.from_pretrained(encoder, num_labels=num_classes)
        else:
            self.model = auto.from_config(transformers.AutoConfig.from_pretrained(encoder, num_labels=num_classes))
        self.config = self.model.config
        self.pad_id = pad_id
        mixer = MixerOptions.of(mixer)
        if swap:
            swap_attention(self.model, mixer)
        elif mixer != MixerOptions():
            raise ValueError("mixer is only used with swap=True")

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for token ids ``(B, N)``."""
        if input_ids.is_meta:  # FLOP counting on a meta twin: transformers reads masks' values, meta has none
            return self.model(input_ids=input_ids).logits
        if key_padding_mask is None:
            key_padding_mask = input_ids == self.pad_id
        return self.model(input_ids=input_ids, attention_mask=(~key_padding_mask).long()).logits
