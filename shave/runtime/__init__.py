"""Loading and running artifacts (TVM runtime + numpy; torch not needed)."""
from .module import Runtime, load

__all__ = ["Runtime", "load"]
