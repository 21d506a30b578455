"""Filter pruning with channel propagation (dependency analysis + removal)."""
from .apply import remove_channels
from .dependency import ChannelAnalysis, ChannelGroup, Unit, analyse
from .prune import Prune

__all__ = ["Prune", "analyse", "remove_channels", "ChannelAnalysis", "ChannelGroup", "Unit"]
