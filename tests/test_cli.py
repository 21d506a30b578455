"""The command line end to end: compile a saved torch.export program or a module:function, then
bench, profile, info and run the artifact."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import shave
from shave.cli import split_passes
from conftest import run_cli


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


def test_split_passes():
    assert split_passes("fold_bn,prune:ratio=0.3:criterion=l2") == ["fold_bn", ("prune", {"ratio": 0.3,
                                                                                          "criterion": "l2"})]
    assert split_passes("fold_bn, prune(ratio=0.3, round_to=1)") == ["fold_bn", "prune(ratio=0.3, round_to=1)"]
    assert split_passes("") == []
    with pytest.raises(shave.PassError, match="write it as key=value"):
        split_passes("prune:ratio")


def test_compile_a_saved_program_then_bench_run_and_info(tmp_path):
    model, x = _model(), torch.randn(1, 3, 12, 12)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    out = run_cli("compile", tmp_path / "m.pt2", "-o", tmp_path / "m.shave", "--passes", "fold_bn")
    assert out.returncode == 0, out.stderr
    assert "fold_bn" in out.stdout and "wrote" in out.stdout
    rt = shave.load(tmp_path / "m.shave")
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(rt(x.numpy()), ref, rtol=1e-4, atol=1e-5)
    bench = run_cli("bench", tmp_path / "m.shave", "--repeats", "5")
    assert bench.returncode == 0 and "median" in bench.stdout and "p90" in bench.stdout, bench.stderr
    np.save(tmp_path / "x.npy", x.numpy())
    run = run_cli("run", tmp_path / "m.shave", tmp_path / "x.npy")
    assert run.returncode == 0 and "min" in run.stdout, run.stderr
    assert run_cli("info", tmp_path / "m.shave").returncode == 0


def test_compile_a_module_function_with_pass_options(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()\n"
        "    return m, (torch.randn(1, 3, 10, 10),)\n")
    out = run_cli("compile", "mymodels:make", "-o", "m.shave", "--passes", "prune:ratio=0.5:round_to=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = shave.load(tmp_path / "m.shave").report
    assert report["prune"].plan == [{"group": "0", "channels": 16, "kept": 8}]


def test_cli_errors_are_one_line_and_help_has_examples(tmp_path):
    for args in (("compile", tmp_path / "missing.pt2", "-o", tmp_path / "x.shave"),
                 ("compile", "nomodule_here:make", "-o", tmp_path / "x.shave"),
                 ("compile", "no_colon", "-o", tmp_path / "x.shave"),
                 ("bench", tmp_path / "missing.shave")):
        out = run_cli(*args)
        assert out.returncode == 1 and out.stderr.startswith("shave: error:"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "shave compile model.pt2" in run_cli("--help").stdout


def test_an_artifact_with_its_ir_compiles_again_for_another_target(tmp_path):
    """Export with include_ir, then build for arm64 (where the cross linker is installed) and for
    generic x86-64 from the artifact alone (no model); shave.load_graph reads the IR back."""
    model, x = _model(), torch.randn(1, 3, 12, 12)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    out = run_cli("compile", tmp_path / "m.pt2", "-o", tmp_path / "m.shave", "--include-ir")
    assert out.returncode == 0, out.stderr
    g = shave.load_graph(tmp_path / "m.shave")
    assert g.op_counts().get("batch_norm", 0) == 0  # the compiled (fold_bn'd) graph, not the captured one
    if shutil.which("aarch64-linux-gnu-gcc"):  # the cross linker (make setup installs it)
        arm = run_cli("compile", tmp_path / "m.shave", "-o", tmp_path / "arm.shave", "--target", "arm64")
        assert arm.returncode == 0, arm.stderr
        info = run_cli("info", tmp_path / "arm.shave")
        assert "aarch64" in info.stdout and "runs here: no" in info.stdout, info.stdout
    generic = run_cli("compile", tmp_path / "m.shave", "-o", tmp_path / "generic.shave", "--target", "x86-64")
    assert generic.returncode == 0, generic.stderr  # another x86 CPU: runs here, same numbers
    np.testing.assert_allclose(shave.load(tmp_path / "generic.shave")(x.numpy()),
                               shave.load(tmp_path / "m.shave")(x.numpy()), rtol=1e-5, atol=1e-6)
    # a graph saved on its own loads back equal; an artifact without IR says how to get one
    path = shave.save_graph(g, tmp_path / "g.ir")
    assert str(shave.load_graph(path)) == str(g)
    assert run_cli("compile", tmp_path / "g.ir", "-o", tmp_path / "g.shave").returncode == 0
    plain = run_cli("compile", tmp_path / "m.pt2", "-o", tmp_path / "plain.shave")
    assert plain.returncode == 0
    with pytest.raises(shave.IRError, match="holds no IR; export it with cm.export"):
        shave.load_graph(tmp_path / "plain.shave")


def test_compress_writes_the_artifact_its_recipe_and_report(tmp_path):
    (tmp_path / "job.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),\n"
        "                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                      nn.Flatten(), nn.Linear(32, 4)).eval()\n"
        "    return m, (torch.randn(1, 3, 16, 16),)\n\n"
        "def score(m):\n    return float(m(torch.ones(2, 3, 16, 16)).abs().mean() >= 0)\n")
    out = run_cli("compress", "job:make", "--eval", "job:score", "--techniques", "prune", "--max-drop", "0.5",
               "--time-budget", "60", "-o", "small.shave", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "small.shave").is_file() and (tmp_path / "small-report" / "README.md").is_file()
    recipe = (tmp_path / "small.shave.recipe.txt").read_text()
    assert "FoldBN(" in recipe and "# steps:" in recipe
    bad = run_cli("compress", "job:make", "--eval", "job:nothing", "-o", "x.shave", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "job:nothing" in bad.stderr
