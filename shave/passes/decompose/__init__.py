"""Low-rank and separable decomposition of conv2d and linear layers."""
from .decompose import Decompose, LayerPlan
from .methods import METHODS, Layer, macs

__all__ = ["Decompose", "LayerPlan", "METHODS", "Layer", "macs"]
