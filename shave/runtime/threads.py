"""How many threads a model runs on: by default every CPU the process may use.

TVM's CPU thread pool is made per calling thread, the first time that thread runs a parallel
kernel, with TVM_NUM_THREADS (or OMP_NUM_THREADS) workers, and without either variable half
the machine's hardware threads on x86 (it assumes hyper-threading): one thread on a 2-core
machine. Importing shave therefore sets TVM_NUM_THREADS to the CPUs this process may run on
(`os.sched_getaffinity`), unless one of the two variables is already set: the user's choice
wins. A pool cannot grow after it is made; a Runtime asks for fewer threads with
`threads=` (TVM's `runtime.config_threadpool`, applied in each calling thread before a call).
"""
from __future__ import annotations

import os
import threading

ENV = "TVM_NUM_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_default_pool_size() -> None:
    """Set TVM_NUM_THREADS to available_cpus() unless TVM_NUM_THREADS or OMP_NUM_THREADS is set."""
    if ENV not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ[ENV] = str(available_cpus())


def pool_size() -> int:
    """The worker count pools made from now on get (what TVM reads)."""
    for var in (ENV, "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            continue
    return available_cpus()


_configured = threading.local()  # the thread count this thread's pool was last set to


def use_threads(n: int) -> None:
    """Run this thread's TVM kernels on n threads (at most its pool's size); a no-op when already so."""
    if getattr(_configured, "n", None) == n:
        return
    from .tvm_import import import_tvm

    import_tvm().get_global_func("runtime.config_threadpool")(1, n)  # 1: TVM's default affinity mode
    _configured.n = n


def check_threads(threads) -> int | None:
    from ..errors import InputError

    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive int (or None: every CPU this process may use), got {threads!r}")
    return threads
