"""shave's parallel launcher (runtime/launcher.c): every task of a launch runs once, any thread
takes a task no other has started, and compiled models run on it where they are loaded."""
import ctypes
import os
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch

import shave
from shave.runtime import launcher
from shave.runtime.artifact import LIB, write_artifact
from shave.runtime.threads import ThreadGovernor
from shave.zoo.fashion_mnist import FashionResNet


class Env(ctypes.Structure):  # TVMParallelGroupEnv
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]


LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Env), ctypes.c_void_p)


@pytest.fixture(scope="module")
def lib():
    lib = launcher.host_launcher()
    assert lib is not None, "the launcher does not build here (gcc)"
    lib.shave_parallel_launch.argtypes = [LAMBDA, ctypes.c_void_p, ctypes.c_int]
    return lib


def _launch(lib, body, num_task: int, threads: int = 2) -> tuple[int, list]:
    """Launch `body(task_id, num_task)` as a parallel loop on `threads` threads; -> (the launch's
    return code, [(task id, num_task, thread ident)] in the order the tasks ran)."""
    ran = []
    lock = threading.Lock()

    def task(i, env, _):
        with lock:
            ran.append((i, env.contents.num_task, threading.get_ident()))
        return body(i, env.contents.num_task)

    f = LAMBDA(task)
    lib.shave_set_threads(threads)
    try:
        rc = lib.shave_parallel_launch(f, None, num_task)
    finally:
        lib.shave_set_threads(0)
    return rc, ran


def test_every_task_runs_once_and_sees_the_task_count(lib):
    for num_task in (0, 1, 2, 7, 64):
        rc, ran = _launch(lib, lambda i, n: 0, num_task)
        want = num_task or 2  # 0: one task per thread
        assert rc == 0
        assert sorted(i for i, _, _ in ran) == list(range(want))
        assert {n for _, n, _ in ran} == {want}


def test_the_caller_takes_the_tasks_a_busy_worker_has_not_started(lib):
    """A worker stuck in its task (as one descheduled by the OS) holds up only that task: the
    caller runs every other one (TVM's pool would leave half of them to the worker)."""
    caller = threading.get_ident()
    released = threading.Event()
    counts = {"caller": 0}

    def body(i, n):
        if threading.get_ident() != caller:
            assert released.wait(30), "the caller never finished the other tasks"
        else:
            counts["caller"] += 1
            if counts["caller"] == n - 1:
                released.set()  # the caller has run all but the worker's task
        return 0

    rc, ran = _launch(lib, body, 8)
    assert rc == 0 and sorted(i for i, _, _ in ran) == list(range(8))
    assert sum(t == caller for _, _, t in ran) >= 7


def test_each_thread_takes_its_own_task_first(lib):
    """Task k goes to thread k (the caller is thread 0, worker w thread w + 1) when no thread
    has taken it, as in TVM's pool: a thread keeps to the rows it wrote in the kernel before."""
    caller = threading.get_ident()
    workers = threading.Barrier(2, timeout=30)
    started = threading.Barrier(3, timeout=30)

    names = {}  # thread ident -> the worker's name (launcher.c names them)

    def body(i, n):
        if threading.get_ident() != caller:
            with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
                names[threading.get_ident()] = f.read().strip()
            workers.wait()  # neither worker finishes before both have claimed their first task
        started.wait()  # the caller holds task 0 until both workers have one
        return 0

    rc, ran = _launch(lib, body, 3, threads=3)
    assert rc == 0 and sorted(i for i, _, _ in ran) == [0, 1, 2]
    by_task = {i: t for i, _, t in ran}
    assert by_task[0] == caller
    assert [names[by_task[k]] for k in (1, 2)] == ["shave-w0", "shave-w1"]


def test_one_thread_and_nested_launches_run_in_the_caller(lib):
    caller = threading.get_ident()
    rc, ran = _launch(lib, lambda i, n: 0, 0, threads=1)
    assert rc == 0 and ran == [(0, 1, caller)]
    inner = []

    def outer(i, n):
        inner.append(_launch(lib, lambda j, m: 0, 0, threads=2))  # a launch inside a task
        return 0

    rc, _ = _launch(lib, outer, 2)
    assert rc == 0 and len(inner) == 2
    for rc_in, ran_in in inner:
        assert rc_in == 0 and len(ran_in) == 1 and ran_in[0][1] == 1  # serial: one task of one


def test_a_failing_task_fails_the_launch(lib):
    rc, ran = _launch(lib, lambda i, n: -7 if i == 3 else 0, 6)
    assert rc == -7 and sorted(i for i, _, _ in ran) == list(range(6))  # the others still ran


def _in_thread(fn):
    """Run fn() in a new thread (its own pool, made with the thread's CPUs) and return its result."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the thread did not finish in 60 s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _workers() -> set[int]:
    """The thread ids of every launcher worker in this process."""
    tids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("shave-w"):
                    tids.add(int(tid))
        except OSError:  # a thread that just ended
            pass
    return tids


def _new_worker(before: set[int]) -> int:
    """The one launcher worker not in `before` (a worker names itself once it runs: waited for)."""
    deadline = time.monotonic() + 30
    while not (new := _workers() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    (worker,) = new
    return worker


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to keep the worker off one")
def test_workers_keep_off_the_cpu_their_caller_runs_on(lib):
    """A worker woken on its caller's CPU waits for the caller's time slice; the launcher lets its
    workers run on every CPU of the pool but the caller's, and follows the caller when it moves.
    A caller with one CPU shares it with its workers."""
    a, b = sorted(os.sched_getaffinity(0))[:2]

    def follows():
        os.sched_setaffinity(0, {a, b})  # the pool's CPUs: what this thread may use when it is made
        before = _workers()
        assert _launch(lib, lambda i, n: 0, 2)[0] == 0
        worker = _new_worker(before)
        masks = []
        for cpu in (a, b, a):
            os.sched_setaffinity(0, {cpu})  # the caller moves to `cpu`
            assert _launch(lib, lambda i, n: 0, 2)[0] == 0
            masks.append(os.sched_getaffinity(worker))
        return masks

    assert _in_thread(follows) == [{b}, {a}, {b}]

    def alone():
        os.sched_setaffinity(0, {a})
        before = _workers()
        assert _launch(lib, lambda i, n: 0, 2)[0] == 0
        return os.sched_getaffinity(_new_worker(before))

    assert _in_thread(alone) == {a}


def _slice(tid: int = 0) -> tuple[int, int]:
    """(policy, scheduler slice in ns) of thread `tid` (0: this one), from sched_getattr."""
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(48)
    nr = {"x86_64": 315, "aarch64": 275}[os.uname().machine]
    assert libc.syscall(nr, tid, buf, 48, 0) == 0, os.strerror(ctypes.get_errno())
    size, policy, flags, nice, prio, runtime, deadline, period = struct.unpack("IIQiIQQQ", buf.raw)
    return policy, runtime


def _custom_slices(lib) -> bool:
    """Whether this kernel keeps a thread's own slice (Linux 6.12 and later), tried in a thread."""
    def probe():
        had = lib.shave_set_slice(3_000_000)
        return had >= 0 and _slice()[1] == 3_000_000

    return _in_thread(probe)


def test_the_caller_sets_its_slice_and_gets_back_the_one_it_had(lib):
    """shave_set_slice sets the calling thread's slice and returns the one it had (so Runtime can
    give it back after a call), keeps the thread's policy, and leaves a thread of another policy
    than SCHED_OTHER or SCHED_BATCH alone (-1)."""
    if not _custom_slices(lib):
        pytest.skip("this kernel has no per-thread scheduler slice (Linux < 6.12)")
    call = lib.shave_call_slice()
    assert call == 100_000_000  # the kernel's longest

    def other():
        policy, own = _slice()
        assert lib.shave_set_slice(call) == own
        assert _slice() == (policy, call)
        assert lib.shave_set_slice(own) == call
        assert _slice() == (policy, own)

    _in_thread(other)

    def batch():
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # this thread only
        _, own = _slice()
        assert lib.shave_set_slice(call) == own and _slice() == (os.SCHED_BATCH, call)

    _in_thread(batch)

    def idle():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        before = _slice()
        assert lib.shave_set_slice(call) == -1 and _slice() == before

    _in_thread(idle)


def test_workers_run_with_the_call_slice(lib):
    """The launcher's workers run only inside calls, with the call slice throughout."""
    if not _custom_slices(lib):
        pytest.skip("this kernel has no per-thread scheduler slice (Linux < 6.12)")

    def start():
        before = _workers()
        assert _launch(lib, lambda i, n: 0, 2)[0] == 0
        worker = _new_worker(before)
        deadline = time.monotonic() + 30  # the worker sets its slice as it starts
        while _slice(worker)[1] != lib.shave_call_slice() and time.monotonic() < deadline:
            time.sleep(0.01)
        return _slice(worker)[1]

    assert _in_thread(start) == lib.shave_call_slice()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    torch.manual_seed(0)
    model, x = FashionResNet().eval(), torch.randn(2, 1, 28, 28)
    cm = shave.compile(model, (x,))
    path = cm.export(tmp_path_factory.mktemp("launcher") / "fashion.shave")
    return cm, x, path


def test_compiled_and_loaded_models_run_on_the_launcher(fashion):
    """The artifact carries the launcher; in a fresh process the loaded model's parallel kernels
    run on it, with the outputs of the compiled model (and of TVM's pool), at 1 and 2 threads."""
    cm, x, path = fashion
    assert cm._runtime.launcher
    with zipfile.ZipFile(path) as z:
        assert launcher.MEMBER in z.namelist()
    want = cm(x.numpy())
    from shave.runtime.module import Runtime, load_library

    _, members = shave.runtime.artifact.read_artifact(path)
    on_tvm = Runtime(load_library(members[LIB], launcher=False), cm.manifest, adaptive=False)
    assert not on_tvm.launcher
    np.testing.assert_array_equal(on_tvm(x.numpy()), want)
    np.save(path.with_suffix(".npy"), x.numpy())
    code = f"""
import numpy as np, shave
from shave.runtime import launcher
x = np.load({str(path.with_suffix('.npy'))!r})
outs = []
for threads in (2, 1, 2):
    rt = shave.load({str(path)!r}, threads=threads, adaptive=False)
    outs.append(rt(x))
    assert launcher.launcher().shave_threads() == rt.threads
print(rt.launcher)
np.save({str(path.with_suffix('.out.npy'))!r}, np.stack(outs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]
    for y in np.load(path.with_suffix(".out.npy")):
        np.testing.assert_array_equal(y, want)


def test_the_governor_times_models_on_tvms_pool_only(fashion):
    """On TVM's pool a static chunk waits for a descheduled worker, so the governor times the calls
    and may drop to one thread; on the launcher any thread takes a chunk not yet started, and the
    calls run on the thread count as set, neither timed nor probed at another count."""
    cm, x, path = fashion
    from shave.runtime.module import Runtime, load_library

    _, members = shave.runtime.artifact.read_artifact(path)
    on_tvm = Runtime(load_library(members[LIB], launcher=False), cm.manifest)
    on_launcher = shave.load(path)
    assert on_launcher.launcher and not on_tvm.launcher and on_launcher.adaptive and on_tvm.adaptive
    for _ in range(2 * ThreadGovernor.WINDOW):
        on_tvm(x.numpy())
        on_launcher(x.numpy())
    assert len(on_tvm.governor.recent) > 0
    assert not on_launcher.governor.recent and on_launcher.governor.next_probe is None


def test_an_artifact_without_the_launcher_runs_on_tvms_pool(fashion, tmp_path):
    """An artifact of an older shave (no launcher member) loads and runs, on TVM's pool."""
    cm, x, path = fashion
    _, members = shave.runtime.artifact.read_artifact(path)
    del members[launcher.MEMBER]
    old = write_artifact(tmp_path / "old.shave", cm.manifest, members)
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import numpy as np, shave, tvm
rt = shave.load({str(old)!r}, threads=1)
np.save({str(tmp_path / 'y.npy')!r}, rt(np.load({str(tmp_path / 'x.npy')!r})))
print(rt.launcher, tvm.get_global_func("runtime.NumThreads")())  # TVM's pool at the runtime's count
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "1"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), cm(x.numpy()))


def test_libraries_use_the_highest_launcher_version(tmp_path):
    """Launchers of several versions in one process (artifacts of different shave versions): a
    library loaded later runs on the highest version loaded so far, whatever the order; a
    thread count goes to all of them."""
    builds = {}
    for version in (0, 1, 5):
        out = tmp_path / f"v{version}.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-DSHAVE_LAUNCHER_VERSION={version}", "-o", str(out),
                        str(launcher.SOURCE), "-lpthread"], check=True)
        builds[version] = str(out)
    code = f"""
from shave.runtime import launcher
def load(v):
    return launcher.load_launcher(open({builds!r}[v], "rb").read())
print(load(1).shave_launcher_version(), load(0).shave_launcher_version(), load(5).shave_launcher_version(),
      load(1).shave_launcher_version(), launcher.loaded())
launcher.set_threads(3)
print(sorted(lib.shave_threads() for lib in launcher._loaded.values()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["1 1 5 5 3", "[3, 3, 3]"]


def test_an_aarch64_artifact_carries_an_aarch64_launcher(tmp_path):
    """Built with the cross compiler where it is installed; without it the artifact has none (its
    kernels then run on TVM's pool where it is loaded)."""
    import shutil

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU()).eval()
    cm = shave.compile(m, (torch.randn(1, 3, 64, 64),), target="arm64")
    with zipfile.ZipFile(cm.export(tmp_path / "arm.shave")) as z:
        data = z.read(launcher.MEMBER) if launcher.MEMBER in z.namelist() else None
    if shutil.which(launcher.CROSS_COMPILERS["aarch64"]) is None:
        assert data is None
    else:
        assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183  # EM_AARCH64


def test_a_long_call_runs_with_the_call_slice_and_gives_back_the_callers(fashion, monkeypatch):
    """After a call of LONG_CALL_S or more, the next call sets the calling thread's slice to the
    launcher's call slice and gives back the one the thread had, also when the call fails; after
    a shorter call, the slice is not touched (1 us a call, against a 15 us LeNet-5)."""
    from shave.errors import InputError
    from shave.runtime import module

    cm, x, path = fashion
    rt = shave.load(path)
    assert rt._slice is not None and rt._slice[1] == launcher.launcher().shave_call_slice()
    calls = []

    def fake(ns):
        calls.append(ns)
        return 1_234_567 if len(calls) % 2 else 0  # the thread's own slice, then the call slice

    rt._slice = (fake, 100_000_000)
    monkeypatch.setattr(module, "LONG_CALL_S", 0.0)
    rt(x.numpy())  # the first call: no call before it was long
    assert calls == []
    rt(x.numpy())
    assert calls == [100_000_000, 1_234_567]
    def failing(batch, arrays):
        raise RuntimeError("a kernel failed")

    rt._run = failing
    with pytest.raises(RuntimeError):
        rt(x.numpy())
    assert calls == [100_000_000, 1_234_567] * 2
    del rt._run
    monkeypatch.setattr(module, "LONG_CALL_S", 1e9)
    rt(x.numpy())  # long before: set; now short
    rt(x.numpy())
    assert calls == [100_000_000, 1_234_567] * 3
    with pytest.raises(InputError):  # a bad input fails before the slice is touched
        rt(x.numpy()[:, :, :5])
    assert len(calls) == 6


def test_a_call_leaves_the_threads_slice_as_it_was(fashion, monkeypatch):
    """With the real setter: the calling thread's slice after calls is the one it had before."""
    from shave.runtime import module

    lib = launcher.launcher()
    if not _custom_slices(lib):
        pytest.skip("this kernel has no per-thread scheduler slice (Linux < 6.12)")
    cm, x, path = fashion
    monkeypatch.setattr(module, "LONG_CALL_S", 0.0)
    rt = shave.load(path)

    def calls():
        before = _slice()
        for _ in range(3):
            rt(x.numpy())
        return before, _slice()

    before, after = _in_thread(calls)
    assert after == before
