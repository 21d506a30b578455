"""`shave` command line: inspect, run and profile artifacts (torch not needed)."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from . import load
from .errors import ShaveError
from .runtime.report import Report
from .runtime.artifact import read_artifact
from .runtime.module import target_mismatch


def _info(args) -> None:
    # reads the manifest only (checksums checked): artifacts for other machines can be inspected too
    m, _ = read_artifact(args.artifact)
    t = m["target"]
    print(f"{args.artifact}: shave {m['shave_version']}, TVM {m['versions']['tvm']}")
    print(f"target: {t['name']} ({t['arch']}, {t['dict'].get('mcpu', '')}; needs {', '.join(t['cpu_features']) or '-'})")
    for kind in ("inputs", "outputs"):
        for v in m[kind]:
            print(f"{kind[:-1]:6} {v['name']}: {v['dtype']}[{','.join(map(str, v['shape']))}]")
    runs_here = target_mismatch(t)
    print(f"runs here: {'no: ' + runs_here if runs_here else 'yes'}")
    if "tuning" in m:
        print(m["tuning"]["summary"])
    print()
    print(Report.from_dict(m.get("report", {})))


def _run(args) -> None:
    rt = load(args.artifact)
    outs = rt.run(*[np.load(p) for p in args.inputs])
    if args.out:
        np.savez(args.out, *outs)
    for (name, _, _), o in zip(rt.outputs, outs):
        print(f"{name}: {o.dtype}{list(o.shape)} min {o.min():.4g} max {o.max():.4g}"
              + (f" argmax {int(o.reshape(o.shape[0], -1).argmax(1)[0])}" if o.ndim == 2 else ""))


def _profile(args) -> None:
    rt = load(args.artifact)
    if args.inputs:
        inputs = [np.load(p) for p in args.inputs]
    else:  # random inputs of the signature's shapes (integer inputs: zeros)
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f" else np.zeros(shape, dtype)
                  for _, shape, dtype in rt.inputs]
    p = rt.profile(*inputs, repeats=args.repeats)
    print(f"{args.artifact}: " + str(p).split("\n", 1)[0])
    print(p.table(args.top))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="shave", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="show an artifact's signature, target and compile report")
    p.add_argument("artifact")
    p.set_defaults(fn=_info)
    p = sub.add_parser("run", help="run an artifact on .npy inputs")
    p.add_argument("artifact")
    p.add_argument("inputs", nargs="+", help="one .npy file per model input")
    p.add_argument("--out", help="write the outputs to this .npz file")
    p.set_defaults(fn=_run)
    p = sub.add_parser("profile", help="time an artifact kernel by kernel (random inputs unless .npy files are given)")
    p.add_argument("artifact")
    p.add_argument("inputs", nargs="*", help="one .npy file per model input")
    p.add_argument("--repeats", type=int, default=10, help="runs; each kernel's median is kept")
    p.add_argument("--top", type=int, default=None, help="show only the N slowest kernel calls")
    p.set_defaults(fn=_profile)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except ShaveError as e:
        print(f"shave: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
