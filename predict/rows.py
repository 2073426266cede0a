"""One file to crops (or an error), and a block of logits to one result row.

Both engines call these, so a row means the same whichever engine wrote it, and the numbers are
the service's: the same decoding (JPEG draft decoding for the resize, the pixel limit), the same
crops and :func:`core.scores.crop_average` over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ResdeployError
from core.preprocess import PreprocessConfig, load_crops
from core.scores import crop_average, top_k

COLUMNS = ("path", "top1", "label", "prob", "topk_indices", "topk_labels", "topk_probs", "tta", "sha256", "error")
MAX_FILE_BYTES = 256 * 1024 * 1024  # a file larger than this is an error row, not a read into memory


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode worker needs: picklable, no model."""

    preprocess: PreprocessConfig
    tta: str
    max_pixels: int


def decode_file(path: str, spec: DecodeSpec) -> tuple[np.ndarray | None, str | None]:
    """``(uint8 crops (N, crop, crop, 3), None)``, or ``(None, why)`` for a file that cannot be used.

    Never raises for a bad file: unreadable, too large, not an image, corrupt, too many pixels all
    come back as one line naming the cause.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            return None, f"file is over {MAX_FILE_BYTES // 2**20} MiB"
        if not data:
            return None, "file is empty"
        cfg = spec.preprocess
        return load_crops(data, cfg, spec.tta, spec.max_pixels), None
    except MemoryError:
        return None, "out of memory decoding this image"
    except ResdeployError as e:  # our own messages name the cause already
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - any failure of one file is that file's row, never the run's end
        return None, f"{type(e).__name__}: {e}"


def decode_many(paths: list[str], spec: DecodeSpec) -> list[tuple[np.ndarray | None, str | None]]:
    """:func:`decode_file` over a chunk of paths (one inter-process round trip per chunk)."""
    return [decode_file(p, spec) for p in paths]


def result_row(path: str, logits: np.ndarray | None, error: str | None, k: int, labels: list[str], tta: str,
               sha256: str) -> dict:
    """The output row of one input: its crops' logits, or the error that kept it from the model."""
    row = dict.fromkeys(COLUMNS)
    row.update(path=path, tta=tta, sha256=sha256, error=error)
    if error is None:
        best = top_k(crop_average(logits), k, labels)
        row.update(top1=best[0]["index"], label=best[0]["label"], prob=best[0]["prob"],
                   topk_indices=[b["index"] for b in best], topk_labels=[b["label"] for b in best],
                   topk_probs=[b["prob"] for b in best])
    return row
