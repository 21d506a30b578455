"""Whether a CPU kernel runs its outer loop on the thread pool: by its work, not always.

A parallel loop is a round trip through TVM's thread pool: the calling thread hands out the
chunks, wakes the workers (a sleeping worker's wake-up, an interrupt to an idle virtual CPU, took
up to 10 us on the development VMs) and waits at a barrier for the slowest. For a kernel of a
few microseconds that costs more than the split saves: LeNet-5 (a 320 K and a 240 K
multiply-add conv, the rest smaller) took 0.049 ms a call on two threads with every kernel
parallel and 0.025 with none (Zen 4 VM), while the Fashion-MNIST ResNet went from 0.104 ms to
0.123 with its 0.9-1.0 M multiply-add convs serial and to 0.158 with all serial. So shave's
compute kernels (conv, Winograd, int8, matmul, softmax) ask `worth_parallel` before they
parallelise a loop, with the kernel's work counted on its unscheduled function: the
iterations of every block (a conv's block runs once per multiply-add; a pack or output stage
once per element); below MIN_PARALLEL_WORK the kernel
runs on the calling thread alone, whatever the runtime's thread count. The generic schedule
(generic.py: elementwise ops, pools, reductions, whose iterations each move memory) parallelises
a block of at least MIN_PARALLEL_ITERATIONS (LeNet-5's 4.7 K-iteration pools in parallel: 0.035
ms a call against 0.025).
"""
from __future__ import annotations

MIN_PARALLEL_WORK = 1 << 19  # block iterations of a compute kernel (multiply-adds for a conv)
MIN_PARALLEL_ITERATIONS = 1 << 15  # loop iterations of one block of a generic (memory-bound) kernel


def work(func) -> int | None:
    """The iterations of every block of an unscheduled PrimFunc (TE's create_prim_func: one
    block per stage under the root), summed; None where an extent is symbolic."""
    import tvm
    from tvm import tirx

    sch = tvm.s_tir.Schedule(func)
    total = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        n = 1
        for iv in sch.get(block).iter_vars:
            ext = iv.dom.extent
            if not isinstance(ext, tirx.IntImm):  # a symbolic extent: work unknown, assume plenty
                return None
            n *= int(ext)
        total += n
    return total


def worth_parallel(func) -> bool:
    """Whether the kernel `func` (unscheduled) has the work to pay for a thread-pool round trip
    (a kernel whose work is unknown is taken to have it)."""
    n = work(func)
    return n is None or n >= MIN_PARALLEL_WORK
