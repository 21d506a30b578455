"""The artifact file: one zip holding manifest.json and the compiled library.

The manifest records the input/output signature, the target, the versions
that built it, a SHA-256 of every member, and the compile report. Reading
checks all of it before anything is loaded. Parameters are constants inside
the compiled library.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from ..errors import ArtifactError

FORMAT = "shave-artifact/1"
LIB = "lib.so"
DEVICE_SOURCE = "kernels.cu"  # CUDA artifacts: the source of the GPU kernels in lib.so


def write_artifact(path, manifest: dict, members: dict[str, bytes]) -> Path:
    path = Path(path)
    manifest = dict(manifest, format=FORMAT,
                    files={name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                           for name, data in members.items()})
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
        for name, data in members.items():
            z.writestr(name, data)
    tmp.replace(path)  # never leave a half-written artifact under the final name
    return path


def read_artifact(path) -> tuple[dict, dict[str, bytes]]:
    """-> (manifest, members); raises ArtifactError naming the file and the problem."""
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
    return manifest, members
