"""The artifact directory contract: the typed ``manifest.json``, file names, hashing, verification.

Torch-free: the service reads artifacts with this module; ``export`` writes them with it.
An artifact directory holds the ONNX files (and optional TensorRT engines), ``model.pt``,
``labels.json`` and ``manifest.json``; every file is listed with its sha256, which is checked
before it is loaded. :class:`Manifest` and :class:`ArtifactEntry` are the one reading of the
JSON: the schema version is checked in :meth:`Manifest.from_dict` and nowhere else, keys a
reader does not know are kept (``extra``) and written back unchanged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from core.errors import ArtifactError
from core.fsutil import sha256_file
from core.preprocess import PreprocessConfig

MANIFEST = "manifest.json"
LABELS = "labels.json"
WEIGHTS_FILE = "model.pt"
SENSITIVITY = "sensitivity.json"
SCHEMA_VERSION = 1


def _split(cls, data: dict) -> tuple[dict, dict]:
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _joined(obj) -> dict:
    """The object's keys as JSON: unset optional ones left out, ``extra`` merged back, in the order
    they were read (a manifest round-trips unchanged), new keys last."""
    known = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name != "extra"}
    out = {k: v for k, v in known.items() if v is not None or k in obj._always} | obj.extra
    order = getattr(obj, "_read_order", None)
    if order:
        rank = {k: i for i, k in enumerate(order)}
        out = {k: out[k] for k in sorted(out, key=lambda k: rank.get(k, len(rank)))}
    return out


def _typed(cls, data: dict, **known_override):
    known, extra = _split(cls, data)
    obj = cls(**(known | known_override), extra=extra)
    obj._read_order = list(data)
    return obj


@dataclass
class FileRef:
    """A file of the directory with its hash (``labels``, ``sensitivity``, ``calibration``)."""

    file: str
    sha256: str
    bytes: int | None = None
    extra: dict = field(default_factory=dict)
    _always = ("file", "sha256")

    @classmethod
    def from_dict(cls, data: dict | None) -> "FileRef | None":
        if not data:
            return None
        return _typed(cls, data)

    def to_dict(self) -> dict:
        return _joined(self)


@dataclass
class ArtifactEntry:
    """One loadable file: an ONNX flavour, a TensorRT engine or the PyTorch weights.

    Attributes:
        kind: ``onnx`` | ``engine`` | ``pytorch``.
        precision: a flavour name (:mod:`core.flavours`).
        file, sha256, bytes: the file, relative to the directory, and its hash and size.
        backends: the runtimes it is made for.
        top1 .. n: the gate's measurement (``top1``/``top5`` ``None`` on unlabelled data).
        within_budget, budget: the gate's verdict and the budget it was judged against.
        quantization: INT8 flavours: what the quantizer did (float layers, MAC share, ...).
        extra: every other key (a TensorRT engine's build stamp), kept as written.
    """

    kind: str
    precision: str
    file: str
    sha256: str
    bytes: int | None = None
    backends: list[str] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    top1_agreement: float | None = None
    max_logit_diff: float | None = None
    n: int | None = None
    within_budget: bool = True
    budget: str | None = None
    quantization: dict | None = None
    extra: dict = field(default_factory=dict)
    _always = ("kind", "precision", "file", "sha256", "backends", "top1", "top5", "within_budget")

    @classmethod
    def from_dict(cls, data: dict) -> "ArtifactEntry":
        data = {"kind": "onnx", **data}  # the first manifests wrote no kind for ONNX files
        missing = [k for k in ("precision", "file", "sha256") if k not in data]
        if missing:
            raise ArtifactError(f"manifest artifact entry {data!r} lacks {', '.join(missing)}; re-export the artifacts")
        return _typed(cls, data)

    def to_dict(self) -> dict:
        return _joined(self)

    @property
    def stamp(self) -> dict:
        """Everything the entry records, as the TensorRT backend checks it (version, GPU, shapes)."""
        return self.to_dict()


@dataclass
class Manifest:
    """``manifest.json`` of one artifact directory.

    Attributes:
        arch, shortcut, num_classes, input_size: the network.
        preprocess: :class:`core.preprocess.PreprocessConfig` as a dict (see :attr:`preprocess_config`).
        artifacts: every loadable file, :class:`ArtifactEntry`.
        labels: ``labels.json`` (``None``: the class indices are the labels).
        eval: the gate: ``dataset``, ``images``, ``labelled``, ``pytorch_fp32``, ``cpu``, ...
        calibration: the INT8 calibration tensors and where they came from.
        sensitivity: ``sensitivity.json``, the INT8 per-layer table, when one was measured.
        extra: every other key, kept as written.
    """

    arch: str
    num_classes: int
    preprocess: dict
    artifacts: list[ArtifactEntry]
    schema_version: int = SCHEMA_VERSION
    created: str | None = None
    shortcut: str | None = None
    input_size: int | None = None
    input: dict | None = None
    output: dict | None = None
    labels: FileRef | None = None
    source: dict | None = None
    eval: dict = field(default_factory=dict)
    calibration: FileRef | None = None
    sensitivity: FileRef | None = None
    versions: dict = field(default_factory=dict)
    accepted_accuracy_drop: bool = False
    options: dict | None = None
    timings_s: dict | None = None
    extra: dict = field(default_factory=dict)
    _always = ("schema_version", "arch", "num_classes", "preprocess", "artifacts", "calibration")

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> "Manifest":
        """Check the schema version and the required keys, then type the rest.

        Raises:
            ArtifactError: another schema version or a missing key.
        """
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"{where} has schema_version {data.get('schema_version')!r}; this resdeploy "
                                f"reads version {SCHEMA_VERSION}: re-export the artifacts")
        for key in ("arch", "num_classes", "preprocess", "artifacts"):
            if key not in data:
                raise ArtifactError(f"{where} lacks '{key}'; re-export the artifacts")
        return _typed(cls, data, artifacts=[ArtifactEntry.from_dict(a) for a in data["artifacts"]],
                      labels=FileRef.from_dict(data.get("labels")),
                      calibration=FileRef.from_dict(data.get("calibration")),
                      sensitivity=FileRef.from_dict(data.get("sensitivity")),
                      eval=data.get("eval") or {}, versions=data.get("versions") or {})

    def to_dict(self) -> dict:
        """The JSON object, keys in the order they were read."""
        out = _joined(self)
        out["artifacts"] = [a.to_dict() for a in self.artifacts]
        for key in ("labels", "calibration", "sensitivity"):
            if out.get(key) is not None:
                out[key] = out[key].to_dict()
        return out

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def crop(self) -> int:
        """The network's input side (what every backend is fed)."""
        return int(self.preprocess["crop"])

    @property
    def eval_dataset(self) -> str | None:
        """The data the gate measured on (``--eval-data`` or the calibration data)."""
        return self.eval.get("dataset")

    @property
    def model_name(self) -> str:
        """The name Open Inference Protocol clients and Triton use: ``ARCH_DATASET`` (e.g.
        ``resnet20_digits``), or ``ARCH`` when the gate data is unknown; letters, digits, ``_ . -``."""
        raw = f"{self.arch}_{self.eval_dataset}" if self.eval_dataset else self.arch
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._-") or "model"

    @property
    def input_name(self) -> str:
        return (self.input or {}).get("name", "input")

    @property
    def output_name(self) -> str:
        return (self.output or {}).get("name", "logits")

    def entries(self, kind: str = "onnx") -> list[ArtifactEntry]:
        return [a for a in self.artifacts if a.kind == kind]

    def has(self, precision: str, kind: str = "onnx") -> bool:
        return any(a.precision == precision for a in self.entries(kind))

    def find(self, precision: str, kind: str = "onnx") -> ArtifactEntry:
        """The entry of one precision (``kind`` "onnx", "engine" or "pytorch").

        Raises:
            ArtifactError: no such entry; the message lists what the directory has.
        """
        for entry in self.entries(kind):
            if entry.precision == precision:
                return entry
        have = ", ".join(f"{e.precision} ({e.kind})" for e in self.artifacts)
        raise ArtifactError(f"no {kind} artifact of precision '{precision}' here (have: {have}); "
                            f"export it with --precisions {precision}")


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Load and check ``DIR/manifest.json``.

    Raises:
        ArtifactError: missing directory or manifest, unreadable JSON, unknown schema version.
    """
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d} is not an artifact directory (no {MANIFEST}); create one with "
                            "`resdeploy export CKPT --arch A --out DIR`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; re-export the artifacts")
    return Manifest.from_dict(data, str(path))


def verify_file(directory: str | os.PathLike, entry: ArtifactEntry | FileRef) -> Path:
    """Check an artifact's sha256 against its manifest entry before it is loaded.

    Raises:
        ArtifactError: missing file, a path outside the directory or a hash mismatch (a truncated
        copy or tampering).
    """
    path = Path(directory) / entry.file
    if Path(entry.file).is_absolute() or ".." in Path(entry.file).parts:
        raise ArtifactError(f"manifest entry {entry.file!r} points outside the artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ArtifactError(f"{path} sha256 {digest[:12]}… does not match the manifest's "
                            f"{entry.sha256[:12]}…: the file was changed or truncated; re-export it")
    return path


def read_labels(directory: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Class names from ``labels.json`` (hash-checked), or the class indices as strings."""
    if manifest.labels is None:
        return [str(i) for i in range(manifest.num_classes)]
    labels = json.loads(verify_file(directory, manifest.labels).read_text())
    if not isinstance(labels, list) or len(labels) != manifest.num_classes:
        raise ArtifactError(f"{manifest.labels.file} must list {manifest.num_classes} class names")
    return [str(v) for v in labels]
