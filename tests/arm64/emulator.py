"""The aarch64 userland (tools/arm64-root.sh) and one emulated run of run_artifacts.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT_SCRIPT = REPO / "tools" / "arm64-root.sh"
RUNNER = Path(__file__).with_name("run_artifacts.py")


class Unavailable(Exception):
    """Emulation cannot be set up on this machine (the message says why)."""


def arm64_root(timeout: float = 900) -> Path:
    """The cached aarch64 root, prepared on first use (~1 min with a fast mirror)."""
    for tool in ("qemu-aarch64-static", "debootstrap"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (apt-get install qemu-user-static debootstrap)")
    try:
        r = subprocess.run(["bash", str(ROOT_SCRIPT), sys.executable], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{ROOT_SCRIPT.name} did not finish within {timeout:.0f} s") from None
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
        raise Unavailable(f"{ROOT_SCRIPT.name} failed: {lines[-1]}")
    return Path(r.stdout.strip().splitlines()[-1])


def run_emulated(root: Path, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """run_artifacts.py with `args` under qemu-aarch64-static, on the root's Python 3.11,
    with shave imported from this checkout and TVM/numpy from the root's aarch64 wheels."""
    env = dict(os.environ, PYTHONPATH=f"/opt/site:{REPO}", TVM_NUM_THREADS="2")
    env.pop("PYTHONHOME", None)
    cmd = ["qemu-aarch64-static", "-L", str(root), str(root / "usr/bin/python3.11"), str(RUNNER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
