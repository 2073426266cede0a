"""Store a finished artifact directory in the local BentoML model store (``export --bento-model``).

The stored model *is* the artifact directory: ``manifest.json``, the ONNX files, ``model.pt``,
``labels.json`` and ``calib/`` sit at ``bentoml.models.get(TAG).path`` exactly as they do under
``--out`` (plus BentoML's own ``model.yaml``), so the service reads it with the same
``read_manifest`` / ``verify_file`` it uses for ``RESDEPLOY_ARTIFACTS`` and ``bentoml build``
packs it into the Bento. The store is ``$BENTOML_HOME/models`` (default ``~/bentoml``).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from core.errors import ConfigError, ExportError
from core.manifest import MANIFEST, read_manifest, sha256_file

log = logging.getLogger(__name__)

# BentoML's tag rule (bentoml/_internal/tag.py: tag_fmt, tag_max_length), copied so that a bad
# name is rejected before the export starts and without importing bentoml (about 2 s).
NAME_RE = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")
NAME_MAX = 63


def validate_model_name(name: str) -> str:
    """Check a model-store name against BentoML's tag rules.

    Raises:
        ConfigError: the name, what is allowed and an example.
    """
    if not NAME_RE.match(name or "") or len(name) > NAME_MAX:
        raise ConfigError(f"--bento-model {name!r} is not a valid BentoML model name: use at most {NAME_MAX} "
                          "lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or "
                          "digit (e.g. resdeploy-digits); BentoML adds the version")
    return name


def save_bento_model(artifact_dir: Path, name: str) -> str:
    """Copy every file of ``artifact_dir`` (relative paths kept) into a new model-store version.

    Args:
        artifact_dir: a complete, installed artifact directory.
        name: model name; BentoML picks the version.

    Returns:
        The new tag, ``name:version``.

    Raises:
        ConfigError: a bad name. ExportError: BentoML could not store the model.
    """
    validate_model_name(name)
    d = Path(artifact_dir)
    manifest = read_manifest(d)
    try:
        import bentoml
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ExportError("--bento-model needs BentoML: pip install 'bentoml>=1.4,<1.5'") from e
    metadata = {"arch": manifest.arch, "num_classes": manifest.num_classes,
                "precisions": [a.precision for a in manifest.entries("onnx")],
                "manifest_sha256": sha256_file(d / MANIFEST), "schema_version": manifest.schema_version}
    labels = {"project": "resdeploy", "arch": manifest.arch}
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            for src in sorted(p for p in d.rglob("*") if p.is_file()):
                dest = Path(model.path) / src.relative_to(d)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
            tag = str(model.tag)
    except (OSError, bentoml.exceptions.BentoMLException) as e:
        raise ExportError(f"could not store {d} as BentoML model {name!r}: {e}") from e
    log.info("stored %s in the BentoML model store as %s", d, tag)
    return tag
