"""ARM (aarch64) and CUDA targets: names, cross-built artifacts, refusal where they cannot run,
and the aarch64 artifacts actually running under qemu user-mode emulation."""
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

import shave
from arm64.emulator import Unavailable, arm64_root, run_emulated
from conftest import rel_err
from shave.backends.tvm.cross import cuda_kernels
from shave.backends.tvm.lower import to_relax
from shave.backends.tvm.schedules.gpu import schedule_gpu
from shave.runtime.host import host_cpu_flags
from shave.target import host_arch, resolve_target, target_arch
from shave.errors import ArtifactError, TargetError
from shave.zoo import FashionResNet, imagenet_samples, load_fashion_mnist, pretrained_mobilenet_v2

EM_AARCH64 = 183  # ELF e_machine
FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")
ON_X86 = host_arch() == "x86_64"


def _has_gpu() -> bool:
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def _library(artifact) -> bytes:
    with zipfile.ZipFile(artifact) as z:
        return z.read("lib.so")


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name,mcpu,attrs", [("arm64", "generic", {"+neon"}), ("rpi4", "cortex-a72", {"+neon"}),
                                             ("rpi5", "cortex-a76", {"+dotprod"}),
                                             ("graviton2", "neoverse-n1", {"+neon", "+dotprod"})])
def test_arm_names(name, mcpu, attrs):
    spec = resolve_target(name)
    assert target_arch(spec) == "aarch64" and spec["mtriple"] == "aarch64-linux-gnu" and spec["mcpu"] == mcpu
    assert attrs <= set(spec["mattr"])


@pytest.mark.parametrize("name,arch", [("sm_90", "sm_90"), ("cuda:sm_80", "sm_80"), ("h100", "sm_90"),
                                       ("a100", "sm_80"), ("t4", "sm_75"), ("l4", "sm_89")])
def test_cuda_names(name, arch):
    spec = resolve_target(name)
    assert target_arch(spec) == "cuda" and spec["arch"] == arch
    assert spec["host"]["mtriple"].startswith(host_arch())


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: 'cuda' detects its arch")
def test_cuda_without_gpu_asks_for_an_arch():
    with pytest.raises(TargetError, match=r"target 'cuda' takes the GPU's arch from this machine, which has no "
                                          r"CUDA GPU; name it instead: 'sm_90', or one of .*h100"):
        resolve_target("cuda")


@pytest.mark.skipif(not ON_X86, reason="target 'x86' is this x86_64 host")
@pytest.mark.parametrize("mcpu", ["znver5", "sapphirerapids"])
def test_x86_host_drops_vector_features_cpuid_does_not_report(monkeypatch, mcpu):
    """LLVM names the host CPU by family and model: a guest whose CPUID shows no AVX-512 on an
    AVX-512 CPU is still `znver5`. The 'x86' target turns off what the host does not report, so
    the code runs there (AVX2, 8 lanes), and adds nothing where the host has every feature."""
    import shave.target as st
    from shave.isa import isa

    monkeypatch.setattr(st, "host_cpu", lambda: mcpu)
    monkeypatch.setattr(st, "host_cpu_features", lambda: {"sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c"})
    spec = resolve_target("x86")
    assert spec["mcpu"] == mcpu and "-avx512f" in spec["mattr"] and "-avx512vnni" in spec["mattr"]
    assert not any(f.startswith("+") for f in spec["mattr"])
    assert isa(spec).fp32_lanes == 8 and isa(spec).vector_registers == 16 and isa(spec).int8_dot == "avx2"
    assert "avx512f" not in st.required_features(spec) and "avx2" in st.required_features(spec)

    implied = st.host_missing_features(mcpu, host=set())  # everything it implies, as names
    monkeypatch.setattr(st, "host_cpu_features", lambda: set(implied))
    spec = resolve_target("x86")
    assert "mattr" not in spec and isa(spec).fp32_lanes == 16


def test_unknown_target_lists_the_names():
    with pytest.raises(TargetError, match=r"unknown target 'sm_x'; known names: .*rpi4.*graviton2.*h100.*sm_XX"):
        resolve_target("sm_x")


# ---------------------------------------------------------------- ARM

def _fashion():
    torch.manual_seed(0)
    model = FashionResNet().eval()
    images, _ = load_fashion_mnist("test")
    return model, images[:2]


def _mobilenet():
    images, _ = imagenet_samples()
    return pretrained_mobilenet_v2().eval(), images[:1]


def _fashion_int8():
    """The Fashion ResNet quantized (8-bit weights: no target here saturates) as an IR graph, which
    is its own reference: the compiled int8 code must give the reference kernels' numbers."""
    from shave.reference import run_graph
    from shave.passes import FoldBN, Quantize

    model, x = _fashion()
    train, _ = load_fashion_mnist("train")
    g = Quantize([train[i:i + 16] for i in range(0, 64, 16)], reduce_range=False)(
        FoldBN()(shave.capture(model, (x,))))
    return g, x, run_graph(g, [x.numpy()])[0]


@pytest.fixture(scope="module")
def arm_artifacts(tmp_path_factory):
    """FashionResNet for a Raspberry Pi 4, the real-weight MobileNetV2 for Graviton2, and the int8
    FashionResNet for a Raspberry Pi 5 (sdot kernels) and a Pi 4 (no dot product: plain int32 lanes)."""
    if shutil.which("aarch64-linux-gnu-gcc") is None and ON_X86:
        pytest.skip("ARM tests skipped: the cross linker aarch64-linux-gnu-gcc is not installed "
                    "(apt-get install gcc-aarch64-linux-gnu)")
    d = tmp_path_factory.mktemp("arm")
    out = {}
    for name, make, target in (("fashion", _fashion, "rpi4"), ("mobilenet", _mobilenet, "graviton2")):
        model, x = make()
        cm = shave.compile(model, (x,), target=target)
        with torch.no_grad():
            ref = model(x).numpy()
        np.save(d / f"{name}_in.npy", x.numpy())
        out[name] = dict(cm=cm, path=cm.export(d / f"{name}.shave"), x=x, ref=ref, target=target)
    g, x, ref = _fashion_int8()
    for target in ("rpi5", "rpi4"):
        name = f"fashion_int8_{target}"
        cm = shave.compile(g, (x,), target=target)
        np.save(d / f"{name}_in.npy", x.numpy())
        out[name] = dict(cm=cm, path=cm.export(d / f"{name}.shave"), x=x, ref=ref, target=target, exact=True)
    return d, out


def test_arm_artifacts_hold_aarch64_code(arm_artifacts):
    _, arts = arm_artifacts
    for a in arts.values():
        lib = _library(a["path"])
        assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == EM_AARCH64
        assert a["cm"].manifest["target"]["arch"] == "aarch64"
        assert a["cm"].manifest["target"]["name"] == a["target"]
        build = a["cm"].report.rows[-1]
        assert build.stage.startswith("build (llvm ") and (build.error is None) == ON_X86


def test_arm_int8_kernels_use_sdot_where_the_cpu_has_it(arm_artifacts, tmp_path):
    """Cortex-A76 (+dotprod) int8 convs are sdot kernels; the Cortex-A72 build has no sdot."""
    import subprocess

    objdump = shutil.which("aarch64-linux-gnu-objdump") or shutil.which("objdump")
    _, arts = arm_artifacts
    counts = {}
    for target in ("rpi5", "rpi4"):
        so = tmp_path / f"{target}.so"
        so.write_bytes(_library(arts[f"fashion_int8_{target}"]["path"]))
        text = subprocess.run([objdump, "-d", str(so)], capture_output=True, text=True).stdout
        assert "fmla" in text or "mul" in text, f"{objdump} could not disassemble aarch64 code"
        counts[target] = len(re.findall(r"\bsdot\b", text))
    assert counts["rpi5"] > 0 and counts["rpi4"] == 0, counts


@pytest.mark.skipif(not ON_X86, reason="checks refusal of aarch64 code on x86_64")
def test_arm_artifact_refused_on_x86(arm_artifacts):
    _, arts = arm_artifacts
    a = arts["fashion"]
    with pytest.raises(ArtifactError, match=r"built for aarch64 \(target 'rpi4'\), but this machine is x86_64; "
                                            r"run it on aarch64, or rebuild it for this machine \(target='x86'\)$"):
        shave.load(a["path"])
    with pytest.raises(TargetError, match=r"cannot run here: built for aarch64"):
        a["cm"](a["x"])


@pytest.mark.skipif(not ON_X86, reason="checks the description of aarch64 code on x86_64")
def test_cli_info_describes_an_artifact_for_another_machine(arm_artifacts, capsys):
    from shave.cli import main

    _, arts = arm_artifacts
    assert main(["info", str(arts["fashion"]["path"])]) == 0
    out = capsys.readouterr().out
    assert "target: rpi4 (aarch64, cortex-a72" in out
    assert "runs here: no: built for aarch64" in out
    assert "build (llvm cortex-a72)" in out


def test_arm_artifacts_run_and_match_pytorch(arm_artifacts):
    """Both aarch64 artifacts, in one emulated process (starting Python+TVM under qemu is slow),
    against PyTorch on this machine."""
    d, arts = arm_artifacts
    args = []
    for name, a in arts.items():
        args += [str(a["path"]), str(d / f"{name}_in.npy"), str(d / f"{name}_out.npy")]
    if ON_X86:
        try:
            root = arm64_root()
        except Unavailable as e:
            pytest.skip(f"ARM emulation test skipped: {e}")
        r = run_emulated(root, args)
    else:  # on an aarch64 machine, natively
        import subprocess
        import sys
        from arm64.emulator import RUNNER

        r = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    for name, a in arts.items():
        y = np.load(d / f"{name}_out.npy")
        assert y.shape == a["ref"].shape
        if a.get("exact"):  # int8: the reference kernels' numbers, bit for bit
            np.testing.assert_array_equal(y, a["ref"], err_msg=name)
            continue
        assert rel_err(y, a["ref"]) <= 1e-4, (name, rel_err(y, a["ref"]))
        np.testing.assert_allclose(y, a["ref"], rtol=0, atol=1e-4 * np.abs(a["ref"]).max())
        assert (y.argmax(1) == a["ref"].argmax(1)).all()


# ---------------------------------------------------------------- CUDA

@pytest.fixture(scope="module")
def cuda_fashion(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("CUDA build tests skipped: nvcc (the CUDA toolkit) is not on PATH")
    model, x = _fashion()
    cm = shave.compile(model, (x,), target="h100")
    return cm, cm.export(tmp_path_factory.mktemp("cuda") / "fashion.shave"), model, x


def test_cuda_artifact_has_gpu_kernels(cuda_fashion):
    cm, path, _, _ = cuda_fashion
    assert cm.manifest["target"]["arch"] == "cuda" and cm.target["arch"] == "sm_90"
    lib = _library(path)
    assert FATBIN_MAGIC in lib  # compiled GPU code, not only CUDA source
    with zipfile.ZipFile(path) as z:
        assert z.read("kernels.cu").decode() == cm.device_source


def test_cuda_source_has_one_bound_kernel_per_fused_op(cuda_fashion):
    cm, _, _, _ = cuda_fashion
    src = cm.device_source
    rules = {}
    schedule_gpu(to_relax(cm.graph), resolve_target("h100"), rules)
    kernels = cuda_kernels(src)
    assert sorted(kernels) == sorted(f"{name}_kernel" for name in rules)
    convs = [k for k in rules if "conv2d" in k]
    assert len(convs) == 9  # stem; 2 in the first block; 2 + a 1x1 shortcut in each downsampling block
    assert all(rules[k] == "Matmul" for k in convs)  # implicit GEMM, not the fallback
    bodies = re.split(r'extern "C" __global__ void ', src)
    for k in kernels:
        body = next(b for b in bodies if re.match(rf"(__launch_bounds__\(\d+\) )?{k}\(.*\) {{", b))
        assert "threadIdx." in body, k  # (a kernel launched as one block has no blockIdx)
        if "conv2d" in k:
            assert "blockIdx." in body and "__shared__" in body, k  # tiles staged through shared memory


def test_cuda_mobilenet_builds(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("CUDA build tests skipped: nvcc (the CUDA toolkit) is not on PATH")
    model, x = _mobilenet()
    cm = shave.compile(model, (x,), target="sm_80")
    assert FATBIN_MAGIC in _library(cm.export(tmp_path / "mobilenet.shave"))
    rules = {}
    schedule_gpu(to_relax(cm.graph), resolve_target("sm_80"), rules)
    assert sorted(cuda_kernels(cm.device_source)) == sorted(f"{name}_kernel" for name in rules)
    # 52 convs, 30 distinct shapes: pointwise and dense convs as implicit GEMMs, depthwise as reductions
    convs = [rules[k] for k in rules if "conv2d" in k]
    assert len(convs) == 30 and convs.count("Matmul") == 20 and convs.count("GeneralReduction") == 10


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_cuda_artifact_refused_without_gpu(cuda_fashion):
    cm, path, _, x = cuda_fashion
    with pytest.raises(ArtifactError, match=r"fashion.shave: built for CUDA sm_90 \(target 'h100'\), "
                                            r"but this machine has no CUDA GPU"):
        shave.load(path)
    with pytest.raises(TargetError, match="cannot run here: built for CUDA sm_90"):
        cm(x)


@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_cuda_runs_on_gpu(cuda_fashion):
    _, path, model, x = cuda_fashion
    import tvm

    if int(str(tvm.cuda(0).compute_version).replace(".", "")) < 90:
        pytest.skip("the artifact is built for sm_90")
    y = shave.load(path)(x.numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_err(y, ref) <= 1e-4


@pytest.mark.skipif(not ON_X86 or "cpuid_fault" not in host_cpu_flags() or shutil.which("gcc") is None,
                    reason="masking CPUID needs an x86 host with CPUID faulting and gcc")
def test_avx2_host_masks_cpuid_for_every_engine():
    """benchmarks/avx2_host.py: under it PyTorch and shave's 'x86' target see an AVX2 CPU (on an
    AVX2 host as on an AVX-512 one), and a real fault still ends the process as a fault."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "benchmarks" / "avx2_host.py"
    code = ("import torch; from shave.isa import isa; from shave.target import resolve_target; "
            "i = isa(resolve_target('x86')); print(torch.backends.cpu.get_cpu_capability(), i.fp32_lanes, i.int8_dot)")
    r = subprocess.run([sys.executable, str(tool), "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == ["AVX2", "8", "avx2"]
    r = subprocess.run([sys.executable, str(tool), "-c", "import ctypes; ctypes.string_at(0)"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGSEGV
