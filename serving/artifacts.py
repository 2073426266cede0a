"""The artifact directory contract: ``manifest.json`` schema, hashing and verification.

Torch-free: the service reads artifacts with this module; ``export`` writes them with it.
An artifact directory holds the ONNX files (and optional TensorRT engines), ``labels.json`` and
``manifest.json``; every file is listed with its sha256, which is checked before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from resdeploy.errors import ArtifactError

MANIFEST = "manifest.json"
LABELS = "labels.json"
SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")
# Which runtime each ONNX flavour is made for (docs/design.md: int8 is TensorRT's symmetric
# form, int8-cpu is the U8S8 form ONNX Runtime's x86 kernels fuse).
INTENDED_BACKENDS = {"fp32": ["onnxruntime", "tensorrt"], "fp16": ["onnxruntime", "tensorrt"],
                     "int8": ["tensorrt"], "int8-cpu": ["onnxruntime"]}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load and sanity-check ``DIR/manifest.json``.

    Raises:
        ArtifactError: missing directory or manifest, unreadable JSON, unknown schema version.
    """
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d} is not an artifact directory (no {MANIFEST}); create one with "
                            "`resdeploy export CKPT --arch A --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {manifest.get('schema_version')!r}; this resdeploy "
                            f"reads version {SCHEMA_VERSION}: re-export the artifacts")
    for key in ("arch", "num_classes", "preprocess", "artifacts"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks '{key}'; re-export the artifacts")
    return manifest


def find_artifact(manifest: dict, precision: str, kind: str = "onnx") -> dict:
    """The manifest entry of one precision (``kind`` "onnx" or "engine").

    Raises:
        ArtifactError: no such entry; the message lists what the directory has.
    """
    for entry in manifest["artifacts"]:
        if entry["precision"] == precision and entry.get("kind", "onnx") == kind:
            return entry
    have = ", ".join(f"{e['precision']} ({e.get('kind', 'onnx')})" for e in manifest["artifacts"])
    raise ArtifactError(f"no {kind} artifact of precision '{precision}' here (have: {have}); "
                        f"export it with --precisions {precision}")


def verify_file(directory: str | os.PathLike, entry: dict) -> Path:
    """Check an artifact's size and sha256 against its manifest entry before it is loaded.

    Raises:
        ArtifactError: missing file or a hash mismatch (a truncated copy or tampering).
    """
    path = Path(directory) / entry["file"]
    if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
        raise ArtifactError(f"manifest entry {entry['file']!r} points outside the artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ArtifactError(f"{path} sha256 {digest[:12]}… does not match the manifest's "
                            f"{entry['sha256'][:12]}…: the file was changed or truncated; re-export it")
    return path


def read_labels(directory: str | os.PathLike, manifest: dict) -> list[str]:
    """Class names from ``labels.json`` (hash-checked), or the class indices as strings."""
    entry = manifest.get("labels")
    if not entry:
        return [str(i) for i in range(manifest["num_classes"])]
    labels = json.loads(verify_file(directory, entry).read_text())
    if not isinstance(labels, list) or len(labels) != manifest["num_classes"]:
        raise ArtifactError(f"{entry['file']} must list {manifest['num_classes']} class names")
    return [str(v) for v in labels]
