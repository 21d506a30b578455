"""How many threads a model runs on: by default every CPU the process may use.

TVM's CPU thread pool is made per calling thread, the first time that thread runs a parallel
kernel, with TVM_NUM_THREADS (or OMP_NUM_THREADS) workers, and without either variable half
the machine's hardware threads on x86 (it assumes hyper-threading): one thread on a 2-core
machine. Importing shave therefore sets TVM_NUM_THREADS to the CPUs this process may run on
(`os.sched_getaffinity`), unless one of the two variables is already set: the user's choice
wins. A pool cannot grow after it is made; a Runtime asks for fewer threads with
`threads=` (TVM's `runtime.config_threadpool`, applied in each calling thread before a call).
Where the kernels run on shave's launcher (launcher.py), the same count goes to it, per calling
thread.

TVM also pins its pool's threads to cores, the calling thread included (pool thread 0 is
the caller), unless TVM_BIND_THREADS=0. Pinned, the caller stays on core 0 after the call
(and so do threads it starts later, PyTorch's OpenMP workers among them), every process
using shave shares core 0 however many cores are idle, and a kernel thread on a busy core
cannot move to a free one. Importing shave sets TVM_BIND_THREADS=0 unless it is set: two
processes at one thread each ran on one core of two before, each at half speed.
"""
from __future__ import annotations

import os
import threading

from . import launcher

ENV = "TVM_NUM_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


BIND = "TVM_BIND_THREADS"


def set_default_pool_size() -> None:
    """Set TVM_NUM_THREADS to available_cpus() unless TVM_NUM_THREADS or OMP_NUM_THREADS is set,
    and TVM_BIND_THREADS to 0 (threads not pinned to cores) unless it is set."""
    if ENV not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ[ENV] = str(available_cpus())
    os.environ.setdefault(BIND, "0")


def pool_size() -> int:
    """The worker count pools made from now on get (what TVM reads)."""
    for var in (ENV, "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            continue
    return available_cpus()


_configured = threading.local()  # (thread count, TVM's pool too, launchers) as this thread last set them


def use_threads(n: int, tvm_pool: bool = True) -> None:
    """Run this thread's kernels on n threads: on shave's launchers, and on TVM's pool (at most its
    size) unless `tvm_pool` is False (a model on a launcher: configuring TVM's pool makes one,
    whose worker spins for a while, taking a CPU from the launcher's); a no-op when already so."""
    key = (n, tvm_pool, launcher.loaded())
    if getattr(_configured, "key", None) == key:
        return
    if tvm_pool:
        from .tvm_import import import_tvm

        import_tvm().get_global_func("runtime.config_threadpool")(1, n)  # 1: TVM's default affinity mode
    launcher.set_threads(n)
    _configured.key = key


def check_threads(threads) -> int | None:
    from ..errors import InputError

    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive int (or None: every CPU this process may use), got {threads!r}")
    return threads


class ThreadGovernor:
    """Chooses, call by call, between a runtime's full thread count and one thread (for a library
    on TVM's pool: on shave's launcher, where any thread takes a chunk not yet started, the
    runtime keeps its thread count; runtime/module.Runtime).

    TVM splits each parallel loop into equal static chunks, one per thread, and a kernel waits
    for its slowest chunk. When other processes keep the CPUs busy, a descheduled worker
    stalls every kernel for a time slice: MobileNetV2 at 2 threads went from 8.6 ms to 460 ms
    beside two CPU-bound processes on 2 cores, while one thread took 19.5 ms. So the governor
    times every call, keeping the last few times at the count in use, and now and then makes
    a few calls with the other count (a probe): after `first_probe_s`, then at doubling
    intervals up to `max_probe_s` (or SPAN calls, where that is shorter) while the choice holds.
    A probe is PROBE_CALLS calls, cut short at one that takes twice the recent median (under
    contention a call at the full count can take 20x); the median of a whole probe switches when
    it is faster than the recent median by a margin: 10 % for one thread (DROP), 3 % for the
    full count (RETURN), the default, which one thread must clearly beat to take its place (LeNet-5
    at batch 8 on a VM whose second CPU slowed for a spell went to one thread, 69 us a call, and
    stayed there through a benchmark while two threads took 60 us: 13 % faster, but a 3-call
    probe's median on a noisy VM did not clear 10 %). Scheduled probes come SPACING calls apart at
    least (a model of 0.3 s a call probed every second would spend a third of a short run's
    calls at the other count). A probe of the full count makes one call more first, not
    counted unless it takes `spike` times the median: the workers have slept since the last
    call that used them (LeNet-5's first call at 2 threads after a second at one took 0.22 ms,
    the next ones 0.08). Two calls in a row at
    the full count that take `spike` times its recent median probe one thread at once (against
    the slower of them). One such call alone does not:
    on a VM a tick or a host preemption makes a 0.1 ms call take 4x now and then, and a probe
    against one such call sent small models to one thread for good. Under contention that
    lasts, the full count is retried once per `max_probe_s` at most, or once per RECHECK_S where
    its last probe lost by less than CHEAP times: where a busy machine slows two threads about as
    much as one, one thread's calls do not show the other processes stopping, and a governor at
    one thread could wait up to 30 s for the probe that takes it back (ResNet-18 when shave's
    launcher was still governed: 11.3 ms a call at one thread, 7.3 at two). When the median of the
    last WINDOW calls at the count in use moves by `drift` times or more from where it settled
    (other processes started or stopped: ResNet-18 took 3.6x at 2 threads beside two CPU-bound
    processes, below the spike factor, while the probe interval had grown to `max_probe_s` in the
    quiet before), the other count is probed at once. The first WARMUP calls after a pause (a
    gap of more than IDLE_S and twice the typical call) are slow at any count (sleeping workers,
    an idle virtual CPU, cold caches: LeNet-5 at batch 8 took 0.4 ms, then 0.15-0.25, then 0.09
    on the Zen 4 VM), so they are neither probes nor spikes nor in the window: a model timed in
    bursts after pauses had each probe land on the first call of a burst and stayed at one
    thread (0.11 ms) after a lone hiccup instead of going back to two (0.09). A model called only
    now and then (more than MAX_COLD such calls in a row) is judged on those calls as on any.
    It costs a few comparisons per call; the clock is injectable for tests."""

    WINDOW = 5
    PROBE_CALLS = 3
    SPACING = 50
    SPAN = 10_000
    IDLE_S = 1e-3
    WARMUP = 2
    MAX_COLD = 8
    DROP = 1.10  # a probe of one thread switches when this much faster than the full count's recent median
    RETURN = 1.03  # a probe of the full count, against one thread's
    CHEAP = 1.5  # a probe of the full count that lost by less than this is retried within RECHECK_S
    RECHECK_S = 2.0

    def __init__(self, threads: int, clock=None, first_probe_s: float = 1.0, max_probe_s: float = 30.0,
                 spike: float = 4.0, drift: float = 1.5):
        import collections
        import time

        self.full = threads
        self.clock = clock or time.perf_counter
        self.first_probe_s, self.max_probe_s, self.spike, self.drift = first_probe_s, max_probe_s, spike, drift
        self.settled = None  # the median of a full window at `current`, as of the last decision
        self.recent = collections.deque(maxlen=self.WINDOW)  # seconds per call at `current`
        self.current = threads
        self.interval = first_probe_s
        self.next_probe = None  # set at the first call
        self.switches = 0
        self.spikes = []  # the slow calls in a row at the full count (seconds)
        self.last_end = None  # when the last call ended
        self.warming = 0  # calls left in the warm-up after a pause
        self.cold_run = 0  # warm-up calls in a row (no call in between outside a warm-up)
        self.cold = False  # the call pick() was last asked for is a warm-up call, left out
        self.probe = []  # the times of the probe under way (calls at the other count)
        self.probing = 0  # calls of the probe under way so far

    def _longest(self, typical: float | None) -> float:
        """The longest interval between scheduled probes: `max_probe_s`, or SPAN calls where that is
        shorter (a probe of a 0.1 ms model costs microseconds; on a VM whose second CPU is slow for
        a while and then fast again, LeNet-5 stayed at one thread for up to 30 s)."""
        return max(self.first_probe_s, min(self.max_probe_s, self.SPAN * (typical or 0.0)))

    def _spacing(self, typical: float) -> float:
        """Seconds to the next scheduled probe: the interval, and at least SPACING calls."""
        return max(self.interval, self.SPACING * typical)

    def _median(self) -> float | None:
        xs = sorted(self.recent)
        return xs[len(xs) // 2] if xs else None

    def pick(self) -> int:
        """The thread count for the next call."""
        if self.full == 1:
            return 1
        now = self.clock()
        if self.next_probe is None and len(self.recent) == self.WINDOW:  # the first, once a call's time is known
            self.next_probe = now + self._spacing(self._median())
        gap = now - self.last_end if self.last_end is not None else 0.0
        if gap > self.IDLE_S and gap > 2 * (self._median() or 0.0):  # the median only after a gap: not per call
            self.warming = self.WARMUP
        self.cold = self.warming > 0 and self.cold_run < self.MAX_COLD
        due = self.next_probe is not None and now >= self.next_probe and self.recent
        if (self.probing or due) and not self.cold:
            return 1 if self.current == self.full else self.full
        return self.current

    def record(self, threads: int, seconds: float) -> None:
        """The time a call took on `threads` threads (as pick() chose)."""
        if self.full == 1:
            return
        self.last_end = self.clock()
        if self.warming:
            self.warming -= 1
            self.cold_run += 1
        else:
            self.cold_run = 0
        if self.cold:
            return
        typical = self._median()
        if threads != self.current:  # a probe: PROBE_CALLS calls, or one that is plainly slower
            self.probing += 1
            if self.probing == 1 and threads == self.full and typical is not None and seconds < self.spike * typical:
                return  # the first call at the full count wakes the workers, idle since the last one: not counted
            self.probe.append(seconds)
            if typical is not None and seconds < 2 * typical and len(self.probe) < self.PROBE_CALLS:
                return
            margin = self.RETURN if threads == self.full else self.DROP
            median = sorted(self.probe)[len(self.probe) // 2]
            won = typical is not None and median < typical / margin
            if won:
                self.current, self.interval, self.switches = threads, self.first_probe_s, self.switches + 1
                self.recent.clear()
                self.recent.extend(self.probe)
                self.settled = None
            else:
                longest = self._longest(typical)
                if threads == self.full and typical is not None and median < self.CHEAP * typical:
                    longest = min(longest, max(self.first_probe_s, self.RECHECK_S))  # a cheap loss
                self.interval = min(self.interval * 2, longest)
            self.probe, self.probing = [], 0
            self.next_probe = self.clock() + self._spacing(self._median() or 0.0)
            return
        self.recent.append(seconds)
        if threads == self.full and typical is not None and len(self.recent) > 2 and seconds > self.spike * typical:
            self.spikes.append(seconds)
        else:
            self.spikes.clear()
        if len(self.spikes) >= 2:
            # slow calls in a row at full threads: try one thread next, against the slower of them
            self.recent.clear()
            self.recent.append(max(self.spikes))
            self.spikes.clear()
            self.settled = None
            self.next_probe = self.clock()
        elif len(self.recent) == self.WINDOW:
            m = self._median()
            if self.settled is None:
                self.settled = m
            elif m > self.drift * self.settled or m * self.drift < self.settled:
                # the machine changed under this count: compare the other one now
                self.settled, self.interval, self.next_probe = m, self.first_probe_s, self.clock()
