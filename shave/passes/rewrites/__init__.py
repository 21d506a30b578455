"""Rewrites of dense convs into compact blocks: shift + 1x1, grouped + permutations, depthwise separable."""
from .base import Block, ConvRewrite, RewritePlan
from .depthwise import DepthwiseSeparable
from .group import GroupRewrite, balanced_blocks
from .shift import ShiftRewrite

__all__ = ["ShiftRewrite", "GroupRewrite", "DepthwiseSeparable", "ConvRewrite", "RewritePlan", "Block",
           "balanced_blocks"]
