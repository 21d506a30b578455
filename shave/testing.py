"""Helpers for checking shave's torch-free promise."""

# Python source that, run first in a fresh interpreter, makes `import torch` fail;
# prepend it to code that must work where torch is not installed.
BLOCK_TORCH = """
import sys, importlib.abc
class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not importable in this process")
sys.meta_path.insert(0, _BlockTorch())
"""
