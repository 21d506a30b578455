"""torch -> shave IR."""
from .capture import capture, eval_model

__all__ = ["capture", "eval_model"]
