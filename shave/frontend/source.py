"""Finding the user's source line for a traced node."""
from __future__ import annotations

import os
import re

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>[^\n]*)')


def user_source(stack_trace: str | None) -> str:
    """The innermost frame of `stack_trace` outside torch, as 'file.py:12 in forward: code'."""
    if not stack_trace:
        return ""
    frames = [m for m in _FRAME.finditer(stack_trace) if not m["file"].startswith(_TORCH_DIR)]
    if not frames:
        return ""
    m = frames[-1]
    return f"{os.path.basename(m['file'])}:{m['line']} in {m['func']}: {m['code'].strip()}"
