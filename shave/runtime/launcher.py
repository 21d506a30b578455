"""shave's parallel launcher: the compiled kernels' parallel loops with chunks claimed at run time.

TVM's compiled kernels reach a thread pool through a pointer each library holds,
`__TVMBackendParallelLaunch`, which TVM's runtime points at its own pool when it loads the
library. That pool runs one static chunk per thread, and the caller waits for every chunk:
beside two CPU-bound processes on 2 cores, a worker the OS had not scheduled yet held up each
kernel for a time slice (MobileNetV2 at 2 threads went from 3.7 ms to 117-356 ms, ResNet-18
from 12 to 176-213 ms in a one-off script on the Zen 4 VM). launcher.c keeps TVM's chunks (one
per thread: smaller ones left a thread idle on the last uneven chunk, 4-20 % slower when quiet)
but lets every thread, the caller included, claim any chunk not yet started: the caller runs
what no worker has picked up and waits only on chunks under way (the same models: 9-17 ms and
32-42 ms beside the same load, the same speed as TVM's pool when quiet). Its workers keep off
the CPU the caller runs on (following it when it moves): on a VM the kernel woke a sleeping
worker on its caller's CPU after pauses, and there it waited out the caller's time slice. Its
workers, and the thread that calls a model for the length of each call (Runtime), run with a
scheduler slice of 100 ms (`call_slice`), so that beside CPU-bound processes a call that has
started is not cut off every 1.4 ms (Linux 6.12 and later; the CPU share stays the same).

The launcher is a small shared library built from launcher.c with the target's C compiler
when a model is compiled (cached by source and architecture), and stored in the artifact
beside the model's library (MEMBER), so a machine that loads the artifact needs no compiler.
Launchers stay loaded for the life of the process (their pools' threads run their code), one
per distinct build; every library is pointed at the one of the highest version
(`shave_launcher_version`: an artifact from an older shave does not hold back the others), and
a thread count is given to all of them. Without one (an artifact of an older shave, a CUDA build, a
machine without a C compiler at compile time, a non-Linux host), TVM's own pool runs the kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .host import cache_dir, host_arch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("launcher.c")
MEMBER = "launcher.so"  # the artifact member
LAUNCH_POINTER = "__TVMBackendParallelLaunch"
BARRIER_POINTER = "__TVMBackendParallelBarrier"  # present only in libraries whose kernels use a barrier
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc"}  # for a target architecture other than this host's

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}  # launchers loaded in this process, by SHA-256 of the library
_best: ctypes.CDLL | None = None  # the one of the highest version: what libraries are pointed at
_built: dict[str, bytes | None] = {}  # launcher library per architecture, built in this process


def build_launcher(arch: str) -> bytes | None:
    """The launcher library for `arch` (x86_64, aarch64) built from launcher.c, or None where
    there is no compiler for it (logged). Cached on disk by source and architecture."""
    if arch in _built:
        return _built[arch]
    data = None
    cc = "gcc" if arch == host_arch() else CROSS_COMPILERS.get(arch)
    source = SOURCE.read_bytes()
    cached = cache_dir("launcher") / f"{arch}-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if cached.is_file():
        data = cached.read_bytes()
    elif cc is None or shutil.which(cc) is None:
        log.info("no C compiler for %s (%s): kernels will run on TVM's thread pool", arch, cc)
    else:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "launcher.so"
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-lpthread"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                log.warning("building the parallel launcher for %s failed (%s); kernels will run on TVM's "
                            "thread pool", arch, (r.stderr.strip().splitlines() or ["?"])[-1])
            else:
                data = out.read_bytes()
                try:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, cached)
                except OSError:
                    pass  # a read-only cache: built again next process
    _built[arch] = data
    return data


def launcher() -> ctypes.CDLL | None:
    """The launcher libraries loaded from now on are pointed at, if any is loaded."""
    return _best


def _version(lib: ctypes.CDLL) -> int:
    try:
        return int(lib.shave_launcher_version())
    except AttributeError:  # the first launchers had no version
        return 0


def load_launcher(data: bytes | None) -> ctypes.CDLL | None:
    """Load the launcher library `data` unless a copy is loaded already, and make it the one new
    libraries use if its version is the highest; -> that one (None if none loads here)."""
    global _best
    if not data:
        return _best
    digest = hashlib.sha256(data).hexdigest()
    with _lock:
        if digest in _loaded:
            return _best
        fd, path = tempfile.mkstemp(suffix=".so", prefix="shave-launcher-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            lib = ctypes.CDLL(path)  # kept for the life of the process: its pools' threads run its code
            lib.shave_set_threads.argtypes = [ctypes.c_int]
            lib.shave_set_threads.restype = ctypes.c_int
            if hasattr(lib, "shave_set_slice"):  # version 3 on
                lib.shave_set_slice.argtypes = [ctypes.c_longlong]
                lib.shave_set_slice.restype = ctypes.c_longlong
                lib.shave_call_slice.restype = ctypes.c_longlong
        except (OSError, AttributeError) as e:  # another architecture's launcher, a non-Linux host
            log.info("the parallel launcher does not load here (%s); kernels run on TVM's thread pool", e)
            return _best
        finally:
            os.unlink(path)
        _loaded[digest] = lib
        if _best is None or _version(lib) > _version(_best):
            _best = lib
        return _best


def call_slice():
    """(set, ns): the function that sets the calling thread's scheduler slice and returns the one
    it had (-1: none set), and the slice a call runs with; None where no launcher loaded has them."""
    best = _best
    if best is None or not hasattr(best, "shave_set_slice"):
        return None
    return best.shave_set_slice, int(best.shave_call_slice())


def host_launcher() -> ctypes.CDLL | None:
    """The process's launcher, built for this machine if none is loaded (compile time)."""
    return load_launcher(build_launcher(host_arch()))


def install(lib_path: str) -> str:
    """Point the library loaded from `lib_path` at the launcher; -> what its parallel loops run
    on: "launcher", "tvm" (TVM's pool: no launcher is loaded, or its kernels use a barrier inside
    a parallel loop, which tasks claimed at run time cannot honour) or "serial" (it has none)."""
    lib = ctypes.CDLL(lib_path)  # the handle TVM opened (dlopen counts references)
    try:
        try:
            pointer = ctypes.c_void_p.in_dll(lib, LAUNCH_POINTER)
        except ValueError:
            return "serial"  # no parallel loop in this library
        best = _best
        if best is None:
            return "tvm"
        try:
            ctypes.c_void_p.in_dll(lib, BARRIER_POINTER)
            return "tvm"
        except ValueError:
            pass
        pointer.value = ctypes.cast(best.shave_parallel_launch, ctypes.c_void_p).value
        return "launcher"
    finally:
        import _ctypes

        _ctypes.dlclose(lib._handle)  # drop this reference: the library lives as long as TVM's module


def loaded() -> int:
    """How many launchers this process has loaded (what a thread's count was last given to)."""
    return len(_loaded)


def set_threads(n: int) -> None:
    """The thread count the calling thread's launches use, in every launcher loaded."""
    for lib in list(_loaded.values()):
        lib.shave_set_threads(n)
