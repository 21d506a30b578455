"""Int8 quantization: calibration, fake-quant simulation, the integer graph, weight sharing."""
from .calibrate import METHODS, qparams, weight_scales
from .quantize import LayerQuant, Quantize, convert, find_units, simulate

__all__ = ["Quantize", "LayerQuant", "convert", "simulate", "find_units", "METHODS", "qparams", "weight_scales"]
