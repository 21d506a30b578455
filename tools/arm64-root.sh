#!/usr/bin/env bash
# Prepare (once) an aarch64 Debian userland with Python 3.11, numpy and TVM's
# aarch64 runtime wheels, for running aarch64 artifacts under qemu user-mode
# emulation on an x86_64 machine. The root is cached, so later runs return at once.
#
#   tools/arm64-root.sh [python]      # python: the one whose numpy version to match
#
# Root: $SHAVE_ARM64_ROOT, default ~/.cache/shave/arm64-root. Needs
# qemu-aarch64-static, debootstrap, dpkg and network access to a Debian mirror and
# to PyPI (first run only). Exit status 0: ready (the root's path on stdout);
# otherwise the last line on stderr says what is missing.
# binfmt_misc need not be mounted: the root is never chrooted into; qemu is called
# explicitly with -L <root>, and debootstrap's second stage is replaced by
# unpacking every downloaded package with dpkg -x.
set -euo pipefail

PY=${1:-python3}
ROOT=${SHAVE_ARM64_ROOT:-$HOME/.cache/shave/arm64-root}
MIRROR=${SHAVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
TVM_VERSION=0.27.0.post1
TVM_FFI_VERSION=0.1.14.post1
NUMPY_VERSION=$("$PY" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo 2.2.6)
STAMP="bookworm python3.11 apache-tvm==$TVM_VERSION apache-tvm-ffi==$TVM_FFI_VERSION numpy==$NUMPY_VERSION"

fail() { echo "arm64 root: $*" >&2; exit 1; }

if [ -f "$ROOT/.shave-ready" ] && [ "$(cat "$ROOT/.shave-ready")" = "$STAMP" ]; then
    echo "$ROOT"; exit 0
fi
for tool in qemu-aarch64-static debootstrap dpkg; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install qemu-user-static debootstrap)"
done

TMP="$ROOT.partial"
rm -rf "$TMP"
mkdir -p "$TMP"
echo "arm64 root: debootstrap (first stage) into $TMP" >&2
# --foreign: download and unpack only; the second stage would need to run arm64 binaries
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libstdc++6 \
    bookworm "$TMP" "$MIRROR" >"$TMP.log" 2>&1 || fail "debootstrap failed (see $TMP.log): $(tail -1 "$TMP.log")"
for deb in "$TMP"/var/cache/apt/archives/*.deb; do
    dpkg -x "$deb" "$TMP"
done
rm -f "$TMP"/var/cache/apt/archives/*.deb
[ -x "$TMP/usr/bin/python3.11" ] || fail "python3.11 missing from the unpacked root"

echo "arm64 root: aarch64 wheels (tvm $TVM_VERSION, tvm-ffi $TVM_FFI_VERSION, numpy $NUMPY_VERSION)" >&2
WHEELS="$TMP/opt/wheels"
SITE="$TMP/opt/site"
mkdir -p "$WHEELS" "$SITE"
"$PY" -m pip download -q --dest "$WHEELS" --only-binary=:all: --no-deps \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" "numpy==$NUMPY_VERSION" \
    ml_dtypes typing_extensions >"$TMP.log" 2>&1 || fail "pip download of aarch64 wheels failed: $(tail -1 "$TMP.log")"
for whl in "$WHEELS"/*.whl; do
    "$PY" -m zipfile -e "$whl" "$SITE"
done
rm -rf "$WHEELS"

# smallest proof that the userland runs: the emulated interpreter imports numpy
PYTHONPATH=/opt/site qemu-aarch64-static -L "$TMP" "$TMP/usr/bin/python3.11" -c \
    "import platform, numpy; assert platform.machine() == 'aarch64'" \
    || fail "python3.11 does not start under qemu-aarch64-static"
echo "$STAMP" >"$TMP/.shave-ready"
rm -rf "$ROOT" "$TMP.log"
mv "$TMP" "$ROOT"
echo "$ROOT"
