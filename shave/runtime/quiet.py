"""Silence TVM 0.27's stray C++ log lines ("Scope Saving:", "Scope Loaded:")
that it prints on every export and load of a VM executable. Other stderr
output is passed through unchanged."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

_NOISE = ("Scope Saving:", "Scope Loaded:")


@contextlib.contextmanager
def quiet_tvm():
    fd = 2  # TVM's C++ logging writes to the process's fd 2, whatever sys.stderr is
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True)
                    if not any(s in ln for s in _NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
