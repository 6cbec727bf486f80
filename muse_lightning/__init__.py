"""MUSE (parallel multi-scale attention) token mixers for timm and PyTorch Lightning."""
from .adapters import AttentionAdapter, register_attention_adapter
from .attention import MUSEAttention
from .block import MUSEBlock
from .branch import MUSEBranch, TokenLayout
from .conv import MultiScaleDepthwiseConv, MultiScaleDynamicConv
from .datamodules import (
    FashionMNISTDataModule, ImageFolderDataModule, ResumableSampler, RottenTomatoesDataModule, SequenceFileDataModule,
    TextFileDataModule, WordNetGlossesDataModule,
)
from .modules import ClassifierModule, ImageClassifier, SequenceClassifier, TextClassifier, WarmupCosineLR
from .options import MixerOptions
from .sharding import FSDP2Strategy
from .swap import swap_attention
from .vit import MUSEEva, MUSENaFlexVit, MUSEVisionTransformer  # importing registers the muse_vit_* models with timm

__all__ = [
    "AttentionAdapter", "ClassifierModule", "FSDP2Strategy", "FashionMNISTDataModule", "ImageClassifier", "ImageFolderDataModule",
    "MUSEAttention", "MUSEBlock", "MUSEBranch", "MUSEEva", "MUSENaFlexVit", "MUSEVisionTransformer",
    "MixerOptions", "MultiScaleDepthwiseConv", "MultiScaleDynamicConv", "ResumableSampler", "RottenTomatoesDataModule", "SequenceClassifier",
    "SequenceFileDataModule", "TextClassifier", "TextFileDataModule", "TokenLayout", "WarmupCosineLR", "WordNetGlossesDataModule",
    "register_attention_adapter", "swap_attention",
]
__version__ = "0.1.0"
