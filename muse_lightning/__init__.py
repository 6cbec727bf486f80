"""MUSE (parallel multi-scale attention) token mixers for timm and PyTorch Lightning."""
from .attention import MUSEAttention
from .block import MUSEBlock
from .conv import MultiScaleDepthwiseConv, MultiScaleDynamicConv
from .datamodules import (
    FashionMNISTDataModule, ImageFolderDataModule, ResumableSampler, SequenceFileDataModule, TextFileDataModule,
    WordNetGlossesDataModule,
)
from .modules import ClassifierModule, ImageClassifier, SequenceClassifier, TextClassifier
from .swap import swap_attention
from .vit import track_token_layout  # importing registers the muse_vit_* models with timm

__all__ = [
    "ClassifierModule", "FashionMNISTDataModule", "ImageClassifier", "ImageFolderDataModule", "MUSEAttention",
    "MUSEBlock", "MultiScaleDepthwiseConv", "MultiScaleDynamicConv", "ResumableSampler", "SequenceClassifier",
    "SequenceFileDataModule", "TextClassifier", "TextFileDataModule", "WordNetGlossesDataModule", "swap_attention",
    "track_token_layout",
]
__version__ = "0.1.0"
