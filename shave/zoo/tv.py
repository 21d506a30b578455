"""``torchvision.models``, importable beside a torch that torchvision's C++ ops do not match.

torchvision is installed with ``pip install --no-deps torchvision==0.28.0`` so
that it keeps the CPU torch. Its package ``__init__`` then fails (it registers
detection ops: ``operator torchvision::nms does not exist``), but the model
definitions in ``torchvision.models`` are pure Python. Where the real package
imports (a matching torch), it is used as it is; otherwise an empty
``torchvision`` package module with the right ``__path__`` stands in for it, so
that ``torchvision.models`` imports without the ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["torchvision_models"]

_INSTALL_HINT = "torchvision is not installed: pip install --no-deps torchvision==0.28.0"


def _stand_in_package() -> types.ModuleType:
    """An empty ``torchvision`` module whose submodules import from the installed package."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    pkg = types.ModuleType("torchvision")
    pkg.__path__, pkg.__file__ = list(spec.submodule_search_locations), spec.origin
    return pkg


def torchvision_models() -> types.ModuleType:
    """The ``torchvision.models`` module; raises ImportError with the install hint without torchvision."""
    if sys.modules.get("torchvision") is None:
        try:
            import torchvision  # noqa: F401  (the real package, where its C++ ops match this torch)
        except ModuleNotFoundError as exc:
            if exc.name != "torchvision":
                raise
            raise ImportError(_INSTALL_HINT) from None
        except RuntimeError:  # 'operator torchvision::nms does not exist': the CPU torch
            sys.modules["torchvision"] = _stand_in_package()
    return importlib.import_module("torchvision.models")
