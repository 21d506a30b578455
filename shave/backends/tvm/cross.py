"""Exporting a built executable for a target other than this host's CPU.

aarch64 from x86_64: TVM emits aarch64 objects itself (LLVM); only the final
link needs the cross gcc (`gcc-aarch64-linux-gnu`).

CUDA: TVM turns the kernels into CUDA C, and into a GPU binary only when its
CUDA runtime library (`libtvm_runtime_cuda.so`, shipped in the wheel) is
loaded and a `tvm_callback_cuda_compile` hook is registered; otherwise it
silently exports the CUDA *source*, which no GPU can load. That library links
against the driver (`libcuda.so.1`), which a build machine without a GPU does
not have, so `cuda_codegen()` loads a stub driver (nine functions that all
return CUDA_ERROR_STUB_LIBRARY, built here with gcc and cached) just to make
the library loadable, and compiles the kernels with the machine's nvcc to a
fatbin. The stub is never called during a build.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import CompileError
from ...runtime.host import cache_dir
from ...runtime.launcher import CROSS_COMPILERS  # the same compilers link the model and build its launcher
from ...runtime.quiet import quiet_tvm
from ...target import host_arch, target_arch

CUDA_ERROR_STUB_LIBRARY = 34
STUB_DIR = cache_dir("cuda-stub")


class DeviceLibrary(bytes):
    """An exported library's bytes, with the CUDA source its GPU kernels were compiled
    from (None for CPU targets), kept for inspection."""

    device_source: str | None = None


def export_library(ex, target: dict) -> DeviceLibrary:
    """Link the executable into a shared library for `target` and return its bytes."""
    arch = target_arch(target)
    fcompile = None
    if arch not in ("cuda", host_arch()):
        gcc = CROSS_COMPILERS.get(arch)
        if gcc is None:
            raise CompileError(f"cannot link a library for {arch} on this {host_arch()} machine "
                               f"(cross-linking is set up for: {', '.join(CROSS_COMPILERS)})")
        if shutil.which(gcc) is None:
            raise CompileError(f"linking for {arch} needs the cross compiler {gcc}, which is not on PATH "
                               "(apt-get install gcc-aarch64-linux-gnu)")
        from tvm.support import cc

        fcompile = cc.cross_compiler(gcc)
    with tempfile.TemporaryDirectory() as d, quiet_tvm():
        lib = Path(d) / "lib.so"
        ex.export_library(str(lib), fcompile=fcompile)
        data = DeviceLibrary(lib.read_bytes())
    if arch == "cuda":
        data.device_source = cuda_source(ex.mod)
    return data


def cuda_source(mod) -> str | None:
    """The CUDA C of the first CUDA module imported by `mod` (searching depth-first)."""
    if mod.kind == "cuda":
        return mod.inspect_source()
    for sub in mod.imports:
        src = cuda_source(sub)
        if src is not None:
            return src
    return None


def cuda_kernels(source: str) -> list[str]:
    """Names of the `__global__` kernels defined (not just declared) in CUDA source."""
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\) \{', source)


def _stub_driver() -> Path:
    """Build (once) a stub libcuda.so.1 with the driver functions TVM's CUDA runtime imports."""
    import tvm

    runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not runtime.is_file():
        raise CompileError(f"this TVM has no CUDA runtime library ({runtime} is missing)")
    syms = subprocess.run(["nm", "-D", "--undefined-only", str(runtime)], capture_output=True, text=True)
    names = sorted(set(re.findall(r"\bU (cu[A-Z]\w*)$", syms.stdout, re.M)))
    if syms.returncode != 0 or not names:
        raise CompileError(f"cannot list the driver functions {runtime.name} needs (nm: {syms.stderr.strip()})")
    code = "".join(f"int {n}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}\n" for n in names)
    lib = STUB_DIR / "libcuda.so.1"
    src = STUB_DIR / "stub.c"
    if lib.is_file() and src.is_file() and src.read_text() == code:
        return lib
    STUB_DIR.mkdir(parents=True, exist_ok=True)
    src.write_text(code)
    cc = subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib) + ".tmp", str(src)],
                        capture_output=True, text=True)
    if cc.returncode != 0:
        raise CompileError(f"building a stub CUDA driver failed: {cc.stderr.strip().splitlines()[-1:]}")
    os.replace(str(lib) + ".tmp", lib)
    return lib


def _load_cuda_runtime() -> None:
    """Make TVM's CUDA runtime library loaded (it registers the CUDA module format)."""
    import tvm

    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver, where there is one
    except OSError:
        ctypes.CDLL(str(_stub_driver()), mode=ctypes.RTLD_GLOBAL)
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as e:
        raise CompileError(f"TVM's CUDA runtime library does not load: {str(e).strip().splitlines()[-1]}") from None


@contextlib.contextmanager
def cuda_codegen():
    """Within: TVM compiles CUDA kernels to a fatbin with nvcc (not just CUDA source)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise CompileError("target cuda needs nvcc (the CUDA toolkit) on PATH to compile the GPU kernels")
    _load_cuda_runtime()
    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile)

    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"  # nvrtc would need the cuda-python bindings
    try:
        yield
    finally:
        if old is None:
            del os.environ["TVM_CUDA_COMPILE_MODE"]
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old


def codegen_for(target: dict):
    """The context a build for `target` runs in."""
    return cuda_codegen() if target_arch(target) == "cuda" else contextlib.nullcontext()
