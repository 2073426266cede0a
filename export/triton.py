"""A Triton Inference Server model repository from a verified artifact directory.

Torch-free (``core``, ``onnx``, the standard library). One Triton model per artifact that a Triton
backend runs as the flavour table intends: every ONNX file made for ONNX Runtime (platform
``onnxruntime_onnx``) and every TensorRT engine the manifest lists (``tensorrt_plan``). TensorRT's
int8 Q/DQ ONNX (TensorRT builds engines from it; ONNX Runtime runs it unfused) and ``model.pt``
are skipped, one logged line each. Layout (Triton's model repository format)::

    REPO/<model>/config.pbtxt   REPO/<model>/labels.txt   REPO/<model>/1/model.onnx | 1/model.plan

Every copied file is checked against the manifest's sha256; the repository is built in a hidden
sibling of ``REPO`` and swapped in whole (:func:`export.install.install`), so a refused or
interrupted run leaves ``REPO`` as it was. ``config.pbtxt`` is written from :func:`config_dict`
(the JSON form of Triton's ``ModelConfig``) by :func:`export.pbtxt.to_pbtxt`: no protobuf or
tritonclient needed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from core.errors import ArtifactError, ConfigError
from core.flavours import FLAVOURS, ONNXRUNTIME, RUNTIME_NAMES, flavour
from core.manifest import MANIFEST, ArtifactEntry, FileRef, Manifest, read_labels, read_manifest, verify_file
from export.install import install
from export.pbtxt import to_pbtxt

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
VERSION = "1"
DEVICES = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# ONNX element types -> Triton data types (model_config.proto DataType).
DATA_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
              onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
              onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.UINT16: "TYPE_UINT16",
              onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT32: "TYPE_UINT32",
              onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT64: "TYPE_UINT64",
              onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING"}


@dataclass(frozen=True)
class TritonOptions:
    """What ``resdeploy triton`` writes (the flags of the same names).

    Attributes:
        artifacts, out: the artifact directory and the repository to write.
        name: the fp32 ONNX model's name, the others' prefix (default the manifest's ``model_name``).
        precisions: only these flavours (default every one that qualifies).
        max_batch: ``max_batch_size``, a multiple of 10 (ten-crop requests); at most an engine's.
        max_queue_delay_us, instances: dynamic batching delay and instances per model.
        device: ``auto`` (KIND_CPU for ``int8-cpu``, KIND_AUTO for other ONNX), ``cpu`` or ``gpu``
            for the ONNX models; engines are always KIND_GPU.
        overwrite: replace a non-empty ``out``.
    """

    artifacts: str | os.PathLike
    out: str | os.PathLike
    name: str | None = None
    precisions: tuple[str, ...] | None = None
    max_batch: int = 40
    max_queue_delay_us: int = 2000
    instances: int = 1
    device: str = "auto"
    overwrite: bool = False


@dataclass
class TritonModel:
    """One model of the repository: its name, the artifact it holds and its configuration."""

    name: str
    entry: ArtifactEntry
    config: dict = field(default_factory=dict)
    pbtxt: str = ""

    @property
    def platform(self) -> str:
        return "tensorrt_plan" if self.entry.kind == "engine" else "onnxruntime_onnx"

    @property
    def model_file(self) -> str:
        return "model.plan" if self.entry.kind == "engine" else "model.onnx"

    def summary(self) -> str:
        inp, group = self.config["input"][0], self.config["instance_group"][0]
        return (f"{self.name}: {self.platform}, {self.entry.file} ({(self.entry.bytes or 0) / 1e6:.1f} MB), "
                f"input {inp['name']} {inp['data_type'][5:]} {inp['dims']}, max batch "
                f"{self.config['max_batch_size']}, {group['kind']} x{group['count']}")


def validate(opts: TritonOptions) -> None:
    """Check the options that need no artifact directory.

    Raises:
        ConfigError: a bad name, max batch, delay, instance count, device or precision.
    """
    if opts.name is not None and (not NAME_RE.fullmatch(opts.name) or set(opts.name) == {"."}):
        raise ConfigError(f"--name {opts.name!r} is not a Triton model name: use letters, digits, '_', '.', '-' "
                          "(e.g. resnet20_digits)")
    if opts.max_batch < 10 or opts.max_batch % 10:
        raise ConfigError(f"--max-batch {opts.max_batch} must be a positive multiple of 10 (a ten-crop request "
                          "is 10 crops), e.g. 40")
    if opts.max_queue_delay_us < 0 or opts.instances < 1:
        raise ConfigError("--max-queue-delay-us must be >= 0 and --instances >= 1")
    if opts.device not in DEVICES:
        raise ConfigError(f"--device {opts.device!r}: choose one of {', '.join(DEVICES)}")
    for p in opts.precisions or ():
        flavour(p)


def check_out(out: str | os.PathLike, artifacts: str | os.PathLike, overwrite: bool, flag: str = "--out",
              fix: str = "pass --overwrite to replace it") -> Path:
    """The resolved repository path, refused when it would replace the artifacts or another directory.

    ``flag`` and ``fix`` word the messages for the command asking (``export --triton-repo``).

    Raises:
        ConfigError: ``out`` is a file, holds or is the artifact directory, or is non-empty without
        ``overwrite``.
    """
    out, art = Path(out).resolve(), Path(artifacts).resolve()
    if out == art or out in art.parents:
        raise ConfigError(f"{flag} {out} would replace the artifact directory {art}; choose another {flag}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {out} exists and is not empty; {fix}")
    return out


def is_model_repository(path: str | os.PathLike) -> bool:
    """``path`` exists and every entry is a model folder holding ``config.pbtxt`` (one we may replace)."""
    entries = list(Path(path).iterdir()) if Path(path).is_dir() else []
    return bool(entries) and all((e / "config.pbtxt").is_file() for e in entries)


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """10 and its power-of-two multiples up to ``max_batch``, plus ``max_batch``: 40 -> [10, 20, 40]."""
    sizes, n = [], 10
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def select(manifest: Manifest, name: str, precisions: tuple[str, ...] | None = None
           ) -> tuple[list[TritonModel], list[str]]:
    """The models to write, in manifest order, and one line per other artifact saying why it is skipped."""
    models, skipped = [], []
    for entry in manifest.artifacts:
        if precisions is not None and entry.precision not in precisions:
            skipped.append(f"skipped {entry.file}: not in --precisions")
        elif entry.kind == "onnx" and ONNXRUNTIME in entry.backends:
            suffix = "" if entry.precision == "fp32" else f"_{entry.precision}"
            models.append(TritonModel(f"{name}{suffix}", entry))
        elif entry.kind == "engine":
            models.append(TritonModel(f"{name}_{entry.precision}_plan", entry))
        elif entry.kind == "onnx":
            runtimes = " and ".join(RUNTIME_NAMES.get(b, b) for b in entry.backends) or "no runtime"
            skipped.append(f"skipped {entry.file}: made for {runtimes}, not ONNX Runtime (its TensorRT engine is "
                           "written when the manifest lists one: export --trt)")
        else:
            skipped.append(f"skipped {entry.file}: {RUNTIME_NAMES.get(entry.kind, entry.kind)} weights; this "
                           "repository holds ONNX Runtime and TensorRT models")
    return models, skipped


def onnx_io(path: Path, proto: onnx.ModelProto | None = None) -> tuple[list[dict], list[dict]]:
    """The graph's real inputs and outputs, ``{name, data_type, dims}`` with the batch axis dropped.

    Raises:
        ArtifactError: a tensor without a shape, a fixed batch axis or a type Triton lacks.
    """
    graph = (proto or onnx.load(str(path), load_external_data=False)).graph
    weights = {t.name for t in graph.initializer}

    def tensor(v) -> dict:
        t = v.type.tensor_type
        if not t.HasField("shape") or not t.shape.dim:
            raise ArtifactError(f"{path.name}: tensor {v.name!r} has no shape; re-export the ONNX")
        batch, *rest = t.shape.dim
        if batch.HasField("dim_value"):
            raise ArtifactError(f"{path.name}: tensor {v.name!r} has a fixed batch of {batch.dim_value}; Triton's "
                                "batching needs a dynamic batch axis: re-export the ONNX")
        if t.elem_type not in DATA_TYPES:
            raise ArtifactError(f"{path.name}: tensor {v.name!r} has ONNX type {t.elem_type}, which Triton lacks")
        return {"name": v.name, "data_type": DATA_TYPES[t.elem_type],
                "dims": [d.dim_value if d.HasField("dim_value") else -1 for d in rest]}

    return [tensor(v) for v in graph.input if v.name not in weights], [tensor(v) for v in graph.output]


def engine_io(manifest: Manifest, entry: ArtifactEntry) -> tuple[list[dict], list[dict]]:
    """An engine's input and output as its build stamp and the manifest record them."""
    size = int(entry.extra.get("input_size") or manifest.crop)
    return ([{"name": manifest.input_name, "data_type": "TYPE_FP32", "dims": [3, size, size]}],
            [{"name": manifest.output_name, "data_type": "TYPE_FP32", "dims": [manifest.num_classes]}])


def config_dict(name: str, platform: str, inputs: list[dict], outputs: list[dict], *, max_batch: int,
                kind: str, instances: int = 1, max_queue_delay_us: int = 2000, label_output: str | None = None,
                layout: str = "NCHW") -> dict:
    """A model's configuration in the JSON form of Triton's ``ModelConfig`` (model_config.proto).

    ``inputs``/``outputs`` are ``{name, data_type, dims}`` without the batch axis; the output named
    ``label_output`` gets ``label_filename``; 3-d inputs get the ``layout`` format. Warm-up runs zeros
    at batch 1 and 10 (when every dim is known and the batch fits).
    """
    fmt = {"format": f"FORMAT_{layout}"} if layout in ("NCHW", "NHWC") else {}
    config = {
        "name": name, "platform": platform, "max_batch_size": max_batch,
        "input": [{**i, **(fmt if len(i["dims"]) == 3 else {})} for i in inputs],
        "output": [{**o, **({"label_filename": LABELS_FILE} if o["name"] == label_output else {})} for o in outputs],
        "instance_group": [{"count": instances, "kind": kind}],
        "dynamic_batching": {"preferred_batch_size": preferred_batch_sizes(max_batch),
                             "max_queue_delay_microseconds": max_queue_delay_us},
    }
    if all(d > 0 for i in inputs for d in i["dims"]):
        config["model_warmup"] = [
            {"name": f"zeros_batch_{b}", "batch_size": b,
             "inputs": {i["name"]: {"data_type": i["data_type"], "dims": i["dims"], "zero_data": True} for i in inputs}}
            for b in (1, 10) if b <= max_batch]
    else:
        log.info("%s: no warm-up (an input has a dynamic dimension)", name)
    return config


def _copy_verified(directory: Path, entry: ArtifactEntry, dst: Path) -> Path:
    """Copy a hash-checked artifact to ``dst`` and check the copy too (what Triton will load)."""
    shutil.copyfile(verify_file(directory, entry), dst)
    return verify_file(dst.parent, FileRef(dst.name, entry.sha256))


def _self_contained(entry: ArtifactEntry, proto: onnx.ModelProto) -> None:
    """Refuse an ONNX file whose weights live in sidecar files: the manifest hashes only the file
    itself (resdeploy exports self-contained files), so a sidecar could not be verified."""
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        raise ArtifactError(f"{entry.file} keeps weights in external data files, which the manifest does not "
                            "hash; re-export it (resdeploy writes self-contained ONNX files)")


def _build(directory: Path, manifest: Manifest, model: TritonModel, labels: list[str], opts: TritonOptions,
           where: Path) -> None:
    """Write one model folder under ``where`` and fill in ``model.config`` and ``model.pbtxt``."""
    entry, folder = model.entry, where / model.name
    (folder / VERSION).mkdir(parents=True)
    copy = _copy_verified(directory, entry, folder / VERSION / model.model_file)
    if entry.kind == "engine":
        inputs, outputs = engine_io(manifest, entry)
        kind = DEVICES["gpu"]
        comments = [f"TensorRT engine {entry.file}, built from {entry.extra.get('onnx', 'its ONNX file')} (float32 "
                    "input and output, as every resdeploy ONNX file)",
                    f"built with TensorRT {entry.extra.get('tensorrt_version', '?')} on "
                    f"{entry.extra.get('gpu_name', '?')}: Triton must run that TensorRT version on that GPU model"]
    else:
        proto = onnx.load(str(copy), load_external_data=False)  # the verified copy, without its weights
        _self_contained(entry, proto)
        inputs, outputs = onnx_io(copy, proto)
        kind = DEVICES["cpu" if opts.device == "auto" and entry.precision == "int8-cpu" else opts.device]
        fl = FLAVOURS.get(entry.precision)
        comments = [f"flavour {entry.precision} ({fl.quantization or fl.number_format if fl else '?'}), run here by "
                    "ONNX Runtime"]
    label_output = manifest.output_name if len(outputs) > 1 else outputs[0]["name"]
    if not any(o["name"] == label_output and o["dims"][-1:] == [manifest.num_classes] for o in outputs):
        raise ArtifactError(f"{entry.file}: no output {label_output!r} of {manifest.num_classes} classes, as "
                            f"{MANIFEST} says; re-export it")
    model.config = config_dict(model.name, model.platform, inputs, outputs, max_batch=opts.max_batch, kind=kind,
                               instances=opts.instances, max_queue_delay_us=opts.max_queue_delay_us,
                               label_output=label_output, layout=(manifest.input or {}).get("layout", "NCHW"))
    comments.insert(0, f"written by resdeploy triton from {directory.name}/{entry.file} (sha256 {entry.sha256[:12]}…)")
    model.pbtxt = to_pbtxt(model.config, comments) + "\n"
    (folder / "config.pbtxt").write_text(model.pbtxt)
    (folder / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))


def write_repository(opts: TritonOptions) -> tuple[Path, list[TritonModel]]:
    """Write the model repository ``opts.out`` from the artifact directory ``opts.artifacts``.

    Returns:
        The repository's path and its models (each with its configuration and ``config.pbtxt`` text).

    Raises:
        ConfigError: bad options, or an ``out`` that exists and is not empty (without ``overwrite``).
        ArtifactError: a missing or malformed artifact directory, a file whose sha256 does not match
            the manifest (nothing is written), an engine built for a smaller batch, nothing to write.
    """
    validate(opts)
    directory = Path(opts.artifacts)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} does not exist or is not a directory; pass an artifact directory "
                            "written by `resdeploy export`")
    manifest = read_manifest(directory)
    labels = read_labels(directory, manifest)
    if any("\n" in label or "\r" in label for label in labels):
        raise ArtifactError(f"a class name in {manifest.labels.file} holds a line break; {LABELS_FILE} cannot hold it")
    models, skipped = select(manifest, opts.name or manifest.model_name, opts.precisions)
    if not models:
        have = ", ".join(f"{e.precision} ({e.kind})" for e in manifest.artifacts)
        raise ArtifactError(f"nothing to write: no ONNX Runtime file or TensorRT engine of "
                            f"{','.join(opts.precisions or ()) or 'any precision'} in {directory} (have: {have})")
    for m in models:
        engine_max = m.entry.extra.get("max_batch")
        if m.entry.kind == "engine" and (not isinstance(engine_max, int) or engine_max < opts.max_batch):
            raise ArtifactError(f"{m.entry.file} was built for batches up to {engine_max}, not --max-batch "
                                f"{opts.max_batch}; pass a smaller --max-batch or rebuild with export --max-batch")
    out = check_out(opts.out, directory, opts.overwrite)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        for m in models:
            _build(directory, manifest, m, labels, opts, work)
        install(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for line in skipped:  # after the fact: a refused run says one line
        log.info("%s", line)
    return out, models
