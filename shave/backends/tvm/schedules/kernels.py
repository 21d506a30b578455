"""The registry of fp32 conv kernels: each kernel is one class.

A planned conv (schedules/fusion.py) is a `ConvSpec` whose `kernel` field names the kernel that
computes it. A kernel class says which convs it can compute (`supports`), which ones the planner
gives it by default (`chosen`), whether it reads and writes blocked values whose last channel
block is padded (`ragged`, conv_spec.blocked_shape), and provides the rest of the life of a
layer: its register tiles (`default_tile`, `candidate_tiles`: what the tile search measures),
its weights in the kernel's layout (`pack_weight`, in numpy at compile time), the unscheduled
computation (`compute_primfunc`: the workload a tuner schedules) and the default schedule
(`default_schedule`, whose trace a tuner replays). conv.py's functions of the same names
dispatch on the spec through `kernel_of`, so the planner, the lowering, the layer timer and
the tuner never branch on the kernel.

The direct kernel (conv.py: dense, grouped and depthwise, any size), the Winograd F(2x2, 3x3)
kernel (winograd.py) and the lane-groups kernel (lane_groups.py: groups narrower than a
vector, computed inside it with shuffles) are registered here when their modules load. A new
kernel is a subclass with a unique `name`, registered with `@register`; `choose(spec)` gives it the convs its
`chosen` accepts, before kernels of lower `priority` (the direct kernel, priority 0, takes
every conv no other kernel is chosen for).
"""
from __future__ import annotations

REGISTRY: dict[str, "ConvKernelType"] = {}


class ConvKernelType:
    """One fp32 conv kernel (see the module docstring); methods take the layer's ConvSpec."""

    name = ""
    priority = 0  # choose() asks kernels of higher priority first

    def supports(self, spec) -> bool:
        """Whether this kernel computes the conv `spec` describes (layouts aside)."""
        raise NotImplementedError

    def ragged(self, spec) -> bool:
        """Whether the kernel reads and writes blocked values with padding lanes (a last block
        not full, conv_spec.blocked_shape) for the conv `spec`."""
        return False

    def chosen(self, spec) -> bool:
        """Whether the planner gives this kernel the conv by default (measured rules)."""
        return self.supports(spec)

    def default_tile(self, spec) -> tuple[int, int]:
        raise NotImplementedError

    def candidate_tiles(self, spec) -> list[tuple[int, int]]:
        raise NotImplementedError

    def pack_weight(self, spec, w):
        raise NotImplementedError

    def compute_primfunc(self, spec):
        raise NotImplementedError

    def default_schedule(self, spec):
        raise NotImplementedError


def register(cls):
    """Class decorator: add one instance of the kernel class to the registry under its name."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"conv kernel name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls()
    return cls


def _load() -> None:
    """Import the modules whose kernels register themselves."""
    import importlib

    for module in ("conv", "winograd", "lane_groups"):
        importlib.import_module(f"{__package__}.{module}")


def kernel_of(spec) -> ConvKernelType:
    """The kernel named by `spec.kernel`."""
    _load()
    try:
        return REGISTRY[spec.kernel]
    except KeyError:
        raise ValueError(f"unknown conv kernel {spec.kernel!r}; registered: {', '.join(REGISTRY)}") from None


def choose(spec) -> str:
    """The name of the kernel the planner gives the conv `spec` (its `kernel` field ignored): the
    first, by descending priority, whose `chosen(spec)` holds."""
    _load()
    for k in sorted(REGISTRY.values(), key=lambda k: -k.priority):
        if k.chosen(spec):
            return k.name
    raise ValueError(f"no conv kernel takes {spec}")
