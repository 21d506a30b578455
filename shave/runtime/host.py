"""Facts about this machine: its architecture and CPU flags (what loading an artifact checks),
and where shave caches what it builds here."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_mhz() -> float | None:
    """The clock /proc/cpuinfo reports for the first CPU (None where it reports none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def cache_dir(name: str) -> Path:
    """A folder under shave's cache on this machine: $SHAVE_CACHE, else ~/.cache/shave."""
    return Path(os.environ.get("SHAVE_CACHE", Path.home() / ".cache" / "shave")) / name
