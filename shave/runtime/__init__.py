"""Loading and running artifacts (TVM runtime + numpy; torch not needed)."""
from .threads import set_default_pool_size

set_default_pool_size()  # before any TVM thread pool exists (runtime/threads.py)

from .module import Runtime, load  # noqa: E402

__all__ = ["Runtime", "load"]
