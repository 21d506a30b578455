"""The artifact file: one zip holding manifest.json and the compiled library.

The manifest records the input/output signature, the target, the versions
that built it, a SHA-256 of every member, a SHA-256 binding the signature to
the library, and the compile report. Reading checks all of it before anything
is loaded: the members' checksums, the manifest's fields against MANIFEST_SCHEMA,
and that the signature is the one the library was built with (an edited input
shape or dtype would otherwise fail deep inside TVM). Parameters are constants
inside the compiled library.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

from ..errors import ArtifactError

FORMAT = "shave-artifact/1"
LIB = "lib.so"
DEVICE_SOURCE = "kernels.cu"  # CUDA artifacts: the source of the GPU kernels in lib.so


_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
_TENSORS = {"type": list, "items": {"name": str, "shape": ("dims",), "dtype": ("dtype",)}}
# What load() relies on, field by field: a type, a nested schema, or a named rule.
MANIFEST_SCHEMA = {
    "format": str, "shave_version": str, "versions": {"tvm": str},
    "target": {"name": str, "arch": str, "dict": dict, "cpu_features": [str]},
    "inputs": _TENSORS, "outputs": _TENSORS,
    "files": dict,
}


def _check(value, schema, where: str) -> str | None:
    """Why `value` does not fit `schema` (a type, a field dict, a list [item type], _TENSORS, or
    a rule tuple), naming the field; None when it fits."""
    if schema == ("dims",):
        ok = isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                             for d in value)
        return None if ok else f"{where} must be a list of sizes >= 0, not {value!r}"
    if schema == ("dtype",):
        return None if value in _DTYPES else f"{where} must be a dtype ({', '.join(sorted(_DTYPES))}), not {value!r}"
    if isinstance(schema, type):
        return None if isinstance(value, schema) else f"{where} must be a {schema.__name__}, not {value!r}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} must be a list, not {value!r}"
        return next((e for i, v in enumerate(value) if (e := _check(v, schema[0], f"{where}[{i}]"))), None)
    if schema is _TENSORS:
        if not isinstance(value, list) or not value:
            return f"{where} must be a non-empty list of tensors, not {value!r}"
        return next((e for i, v in enumerate(value) if (e := _check(v, schema["items"], f"{where}[{i}]"))), None)
    if not isinstance(value, dict):
        return f"{where} must be an object, not {value!r}"
    for key, sub in schema.items():
        if key not in value:
            return f"{where}.{key} is missing" if where else f"{key} is missing"
        err = _check(value[key], sub, f"{where}.{key}" if where else key)
        if err:
            return err
    return None


def signature_digest(manifest: dict, library: bytes) -> str:
    """SHA-256 over the library and the input/output signature the library was built for."""
    sig = json.dumps({k: manifest.get(k) for k in ("inputs", "outputs", "batch_functions")
                      if k in manifest or k != "batch_functions"}, sort_keys=True).encode()
    return hashlib.sha256(hashlib.sha256(library).digest() + sig).hexdigest()


def write_artifact(path, manifest: dict, members: dict[str, bytes]) -> Path:
    """Write the artifact atomically: to a temporary file beside `path`, renamed over it once
    complete, removed if anything fails; errors name `path`."""
    try:
        path = Path(path)
    except TypeError:
        raise ArtifactError(f"export takes a file path, got {type(path).__name__}") from None
    if path.is_dir():
        raise ArtifactError(f"cannot write artifact {path}: it is a directory")
    if not path.parent.is_dir():
        raise ArtifactError(f"cannot write artifact {path}: directory {path.parent} does not exist")
    manifest = dict(manifest, format=FORMAT,
                    files={name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                           for name, data in members.items()})
    manifest["signature_sha256"] = signature_digest(manifest, members[LIB])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            for name, data in members.items():
                z.writestr(name, data)
        os.replace(tmp, path)  # never leave a half-written artifact under the final name
    except OSError as e:
        raise ArtifactError(f"cannot write artifact {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_artifact(path) -> tuple[dict, dict[str, bytes]]:
    """-> (manifest, members); raises ArtifactError naming the file and the problem."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArtifactError(f"shave.load takes the path of an artifact file, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "manifest.json" not in names:
                raise ArtifactError(f"{path}: not a shave artifact (no manifest.json inside)")
            manifest = json.loads(z.read("manifest.json"))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                got = manifest.get("format") if isinstance(manifest, dict) else None
                raise ArtifactError(f"{path}: not a shave artifact (format {got!r}, expected {FORMAT!r})")
            members = {}
            for name, info in manifest.get("files", {}).items():
                if name not in names:
                    raise ArtifactError(f"{path}: corrupt artifact, member {name} is missing")
                data = z.read(name)
                if hashlib.sha256(data).hexdigest() != info.get("sha256"):
                    raise ArtifactError(f"{path}: corrupt artifact, checksum of {name} does not match the manifest")
                members[name] = data
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path}: corrupt or truncated artifact ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: corrupt artifact (manifest.json is not valid JSON)") from None
    except (OSError, EOFError) as e:
        raise ArtifactError(f"{path}: cannot read artifact ({type(e).__name__}: {e})") from None
    if LIB not in members:
        raise ArtifactError(f"{path}: corrupt artifact, the manifest lists no {LIB}")
    err = _check(manifest, MANIFEST_SCHEMA, "")
    batches = manifest.get("batch_functions", {}) if isinstance(manifest, dict) else {}
    if not err and not (isinstance(batches, dict) and all(isinstance(k, str) and k.isdigit() and int(k) >= 1
                                                          and isinstance(f, str) for k, f in batches.items())
                        and (not batches or "1" in batches)):
        err = f"batch_functions must map batch sizes (including 1) to function names, not {batches!r}"
    if err:
        raise ArtifactError(f"{path}: invalid manifest.json: {err}")
    digest = manifest.get("signature_sha256")
    if digest is not None and digest != signature_digest(manifest, members[LIB]):
        raise ArtifactError(f"{path}: manifest.json was changed after export: its inputs/outputs are not "
                            "the ones the library was built for")
    return manifest, members
