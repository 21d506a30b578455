#!/usr/bin/env python
"""Throughput with several client threads calling one model: shave and ONNX Runtime, side by side.

    python benchmarks/threads.py                        # MobileNetV2 and ResNet-18, 1/2/4/8 client threads
    python benchmarks/threads.py --models mobilenet_v2 --clients 1,4 --calls 64

A web server or a batcher calls one loaded model from a thread pool. Each engine is
built once with `--threads` worker threads (TVM_NUM_THREADS for shave, intra-op threads
for ONNX Runtime, whose sessions are thread-safe); then, for each client count, that
many threads share `--calls` calls on one model object, every output checked against
the single-threaded result. shave runs a Relax VM per calling thread over the one
loaded library. The engines alternate per client count (a pause before each) so a slow
spell of the machine falls on both; the table gives calls per second (median of
`--rounds`) and how many outputs were wrong.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODELS, ensure_shave_importable, host_line, make_input, markdown_table,  # noqa: E402
                    onnxruntime_engine, set_thread_env, shave_engine)


def throughput(run, inputs, expected, clients: int, calls: int) -> tuple[float, int]:
    """(calls per second, wrong outputs) of `clients` threads sharing `calls` calls of run(x)."""
    import numpy as np

    wrong = [0] * clients
    start = threading.Barrier(clients + 1)

    def work(k):
        start.wait()
        for i in range(k, calls, clients):
            j = i % len(inputs)
            if not np.allclose(run(inputs[j]), expected[j], rtol=1e-4, atol=1e-5):
                wrong[k] += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return calls / (time.perf_counter() - t0), sum(wrong)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18")
    ap.add_argument("--clients", default="1,2,4,8", help="client thread counts")
    ap.add_argument("--calls", type=int, default=96, help="calls per measurement, shared by the clients")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="worker threads of each engine")
    ap.add_argument("--pause", type=float, default=0.5)
    args = ap.parse_args(argv)
    set_thread_env(args.threads)
    ensure_shave_importable()
    import torch

    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    print(host_line(args.threads))
    print(f"worker threads per engine: {args.threads}; {args.calls} calls per measurement, median of "
          f"{args.rounds} rounds\n")
    rows = []
    for name in args.models.split(","):
        model, desc = MODELS[name]()
        x = make_input(1)
        engines = {"shave": shave_engine(model, x, args.threads),
                   "onnxruntime": onnxruntime_engine(model, x, args.threads)}
        inputs = [make_input(1, seed=s).numpy() for s in range(4)]
        runs = {k: e.call for k, e in engines.items()}
        expected = [runs["shave"](a) for a in inputs]
        for n in clients:
            rates = {k: [] for k in runs}
            wrong = {k: 0 for k in runs}
            for r in range(args.rounds):
                for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    time.sleep(args.pause)
                    rate, bad = throughput(runs[k], inputs, expected, n, args.calls)
                    rates[k].append(rate)
                    wrong[k] += bad
            med = {k: statistics.median(v) for k, v in rates.items()}
            rows.append([desc.split(",")[0], str(n), f"{med['shave']:.1f}", f"{med['onnxruntime']:.1f}",
                         f"{med['shave'] / med['onnxruntime']:.2f}x", f"{wrong['shave']} / {wrong['onnxruntime']}"])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(markdown_table(["model", "client threads", "shave calls/s", "ORT calls/s", "shave / ORT calls/s",
                          "wrong outputs (shave / ORT)"], rows, right={1, 2, 3, 4}))


if __name__ == "__main__":
    main()
