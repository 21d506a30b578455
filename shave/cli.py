"""`shave` command line: compile models; inspect, run, benchmark and profile artifacts (only
`compile` needs torch)."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from . import load
from .errors import PassError, ShaveError
from .runtime.report import Report
from .runtime.artifact import read_artifact
from .runtime.module import target_mismatch


def _info(args) -> None:
    # reads the manifest only (checksums checked): artifacts for other machines can be inspected too
    m, _ = read_artifact(args.artifact)
    t = m["target"]
    print(f"{args.artifact}: shave {m['shave_version']}, TVM {m['versions']['tvm']}")
    print(f"target: {t['name']} ({t['arch']}, {t['dict'].get('mcpu', '')}; needs {', '.join(t['cpu_features']) or '-'})")
    batches = m.get("batch_functions")
    for kind in ("inputs", "outputs"):
        for v in m[kind]:
            dims = (["N"] if batches else []) + [str(d) for d in v["shape"][1 if batches else 0:]]
            print(f"{kind[:-1]:6} {v['name']}: {v['dtype']}[{','.join(dims)}]")
    if batches:
        print(f"batch:  any N (dynamic; kernels for {', '.join(sorted(batches, key=int))}, larger batches run in chunks)")
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


def _inputs(rt, paths, batch=None) -> list:
    """The .npy files given, or random inputs of the artifact's signature (at `batch`)."""
    return [np.load(p) for p in paths] if paths else rt.example_inputs(batch=batch)


def _profile(args) -> None:
    rt = load(args.artifact)
    p = rt.profile(*_inputs(rt, args.inputs), repeats=args.repeats)
    print(f"{args.artifact}: " + str(p).split("\n", 1)[0])
    print(p.table(args.top))


def _bench(args) -> None:
    rt = load(args.artifact, threads=args.threads)
    for batch in _batches(args.batch) if args.batch else [None]:
        inputs = _inputs(rt, args.inputs, batch)
        r = rt.benchmark(*inputs, repeats=args.repeats, warmup=args.warmup)
        n = inputs[0].shape[0] if inputs and inputs[0].ndim else 1
        print(f"{args.artifact}: batch {n}, {r['calls']} calls, {rt.threads} threads: p10 {r['p10']:.3f} ms, "
              f"median {r['p50']:.3f} ms ({r['p50'] / n:.3f} ms a sample), p90 {r['p90']:.3f} ms, "
              f"mean {r['mean']:.3f} ms, min {r['min']:.3f} ms")


def _batches(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]; a one-line error otherwise."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ShaveError(f"--batch wants batch sizes >= 1 separated by commas (1,8,32), got {text!r}")
    return sizes


def split_passes(text: str) -> list:
    """"fold_bn,prune:ratio=0.3:criterion=l2" or "fold_bn,prune(ratio=0.3)" -> the pass list for
    shave.compile (commas inside parentheses stay with their pass)."""
    import ast

    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "(" in part or ":" not in part:
            out.append(part)
            continue
        name, *opts = part.split(":")
        kwargs = {}
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep:
                raise PassError(f"pass option {opt!r} in {part!r}: write it as key=value")
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()  # a bare word: a string
        out.append((name.strip(), kwargs))
    return out


def _load_model(spec: str):
    """(model, example inputs) from a torch.export program file (.pt2), an artifact exported with
    its IR or an IR file (the graph, inputs None: compile makes random ones), or module:function
    (a function returning (model, example_inputs))."""
    import importlib
    import os
    import zipfile

    import torch

    from .errors import CaptureError

    if os.path.isfile(spec) and not spec.endswith(".pt2") and zipfile.is_zipfile(spec):
        from .api import load_graph

        return load_graph(spec), None

    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise CaptureError(f"{spec}: no such file")
        try:
            ep = torch.export.load(spec)
        except Exception as e:
            raise CaptureError(f"{spec}: not a torch.export program ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        inputs = ep.example_inputs[0] if getattr(ep, "example_inputs", None) else None
        if inputs is None:
            raise CaptureError(f"{spec}: the program holds no example inputs; save it with torch.export.save "
                               "from torch.export.export(model, args)")
        return ep.module(), tuple(inputs)
    module, sep, fn = spec.partition(":")
    if not sep or not fn:
        raise CaptureError(f"model {spec!r}: give a .pt2 file (torch.export.save) or module:function")
    sys.path.insert(0, os.getcwd())
    try:
        made = getattr(importlib.import_module(module), fn)()
    except (ImportError, AttributeError) as e:
        raise CaptureError(f"model {spec!r}: {type(e).__name__}: {e}") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise CaptureError(f"model {spec!r}: {fn}() must return (model, example_inputs)")
    return made


def _compile(args) -> None:
    import shave

    model, inputs = _load_model(args.model)
    tune = shave.TuneOptions(trials=args.tune) if args.tune is not None else None
    passes = split_passes(args.passes) if args.passes is not None else shave.passes.DEFAULT_PASSES
    dynamic = (False if args.dynamic_batch is None else True if args.dynamic_batch == "default"
               else tuple(_batches(args.dynamic_batch)))
    cm = shave.compile(model, inputs, target=args.target, passes=passes, tune=tune, dynamic_batch=dynamic)
    path = cm.export(args.output, include_ir=args.include_ir)
    print(cm.report)
    print(f"wrote {path}")


def _load_callable(spec: str, what: str):
    """The function a module:function names."""
    import importlib
    import os

    module, sep, fn = spec.partition(":")
    if not sep or not fn:
        raise PassError(f"{what} {spec!r}: give module:function")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise PassError(f"{what} {spec!r}: {type(e).__name__}: {e}") from None


def _compress(args) -> None:
    from pathlib import Path

    import shave

    model, inputs = _load_model(args.model)
    evaluate = _load_callable(args.eval, "--eval")
    train = _load_callable(args.train, "--train")() if args.train else None
    calibration = _load_callable(args.calibration, "--calibration")() if args.calibration else None
    r = shave.compress(model, inputs, evaluate, target=args.target, max_drop=args.max_drop, train=train,
                       calibration=calibration, speedup=args.speedup, time_budget=args.time_budget,
                       techniques=tuple(t.strip() for t in args.techniques.split(",") if t.strip()))
    path = r.compiled.export(args.output)
    out = Path(path)
    recipe = out.with_name(out.name + ".recipe.txt")
    recipe.write_text("\n".join(["# shave.compress recipe: the passes, in order (replay from Python with "
                                  "shave.compile(model, x, passes=result.recipe))"] + [repr(p) for p in r.recipe]
                                 + ["# steps: " + "; ".join(r.steps)]) + "\n")
    report = r.save_report(Path(args.report) if args.report else out.with_name(out.stem + "-report"))
    print(r)
    print(f"wrote {path}, {recipe} and {report}")


EXAMPLES = """examples:
  shave compile model.pt2 -o model.shave --target x86 --passes fold_bn,prune:ratio=0.3 --include-ir
  shave compile model.shave -o model-arm.shave --target arm64   # again, from the IR inside
  shave compile mypkg.models:make -o model.shave      # make() returns (model, example_inputs)
  shave compress mypkg.models:make --eval mypkg.data:accuracy --train mypkg.data:train_batches \\
      --calibration mypkg.data:images --max-drop 1.0 -o small.shave
  shave bench model.shave --repeats 200
  shave profile model.shave --top 15
  shave info model.shave
  shave run model.shave x.npy --out y.npz"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="shave", description=__doc__, epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p = sub.add_parser("bench", help="latency percentiles of an artifact (random inputs unless .npy files are given)")
    p.add_argument("artifact")
    p.add_argument("inputs", nargs="*", help="one .npy file per model input")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: every CPU this process may use")
    p.add_argument("--batch", default=None, metavar="SIZES",
                   help="random inputs at these batch sizes, e.g. 1,8,32 (other than the signature's: a "
                        "dynamic-batch artifact)")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("compile", help="compile a model into an artifact (needs torch)",
                       epilog="MODEL: a torch.export program file (.pt2, saved with example inputs), an "
                              "artifact exported with its IR (--include-ir) or an IR file, or module:function "
                              "returning (model, example_inputs)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the artifact to write")
    p.add_argument("--target", default="x86", help="x86, arm64, rpi4, h100, ... (default x86)")
    p.add_argument("--passes", default=None,
                   help="comma-separated: fold_bn,prune:ratio=0.3 or prune(ratio=0.3); default: shave's defaults; "
                        "'' for none")
    p.add_argument("--tune", type=int, default=None, metavar="TRIALS", help="tune the conv kernels (0: tile search only)")
    p.add_argument("--dynamic-batch", nargs="?", const="default", default=None, metavar="SIZES",
                   help="one artifact for any batch size: kernels for batch 1 and 8 (or these sizes, e.g. 1,4,32), "
                        "other batches run in chunks of them")
    p.add_argument("--include-ir", action="store_true",
                   help="keep the compiled IR in the artifact, so it can be compiled again for another target")
    p.set_defaults(fn=_compile)
    p = sub.add_parser("compress", help="search for the fastest artifact within an accuracy budget (needs torch)",
                       epilog="MODEL as for compile; --eval names a function module -> score (higher is better), "
                              "--train and --calibration functions returning the data")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the artifact to write; the recipe and report go beside it")
    p.add_argument("--eval", required=True, metavar="MODULE:FUNCTION", help="evaluate(module) -> score")
    p.add_argument("--train", metavar="MODULE:FUNCTION", help="returns (inputs, labels) or inputs batches")
    p.add_argument("--calibration", metavar="MODULE:FUNCTION", help="returns example input batches (int8)")
    p.add_argument("--max-drop", type=float, default=0.01, help="in the score's units (default 0.01)")
    p.add_argument("--speedup", type=float, default=None, help="stop once this much faster")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    p.add_argument("--techniques", default="prune,decompose,rewrites,quantize")
    p.add_argument("--target", default="x86")
    p.add_argument("--report", default=None, help="report directory (default: beside the artifact)")
    p.set_defaults(fn=_compress)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except ShaveError as e:
        print(f"shave: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
