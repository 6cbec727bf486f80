"""MUSE (parallel multi-scale attention) token mixers for timm and PyTorch Lightning."""
from .attention import MUSEAttention
from .block import MUSEBlock
from .conv import MultiScaleDepthwiseConv, MultiScaleDynamicConv

__all__ = ["MUSEAttention", "MUSEBlock", "MultiScaleDepthwiseConv", "MultiScaleDynamicConv"]
__version__ = "0.1.0"
