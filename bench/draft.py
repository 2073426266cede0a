"""What JPEG draft decoding costs in accuracy and saves in time, on one artifact directory.

``python bench/draft.py artifacts/digits --upscale 8`` encodes the labelled images the export gate
measured on (the manifest's ``eval.dataset``, or ``--dataset``) as JPEGs ``--upscale`` times their
size (quality ``--quality``), then classifies every one twice with the served file, decoding it
fully and with draft decoding (core.preprocess.decode_image ``draft``: what evaluation, calibration
and serving now do), and reports top-1 of both, their top-1 agreement, the largest change in the
top-1 probability and the decode + crop time per image of each. Also runs scikit-image's colour
photos (no labels: agreement only) when scikit-image is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import io  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import machine_header, machine_info, write_results  # noqa: E402
from core.preprocess import crops_uint8, decode_image  # noqa: E402
from core.scores import softmax  # noqa: E402
from resdeploy.cli import OneLineParser  # noqa: E402


def _jpeg(img: Image.Image, upscale: int, quality: int) -> bytes:
    if upscale != 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _classify(model, jpegs: list[bytes], tta: str, draft: bool) -> tuple[np.ndarray, float]:
    """Mean-over-crops probabilities (N, classes) and decode + crop ms per image."""
    cfg, probs, decode_s = model.preprocess, [], 0.0
    for data in jpegs:
        t0 = time.perf_counter()
        crops = crops_uint8(decode_image(data, draft=cfg.resize if draft else None), cfg, tta)
        decode_s += time.perf_counter() - t0
        probs.append(softmax(model.backend.infer_uint8(crops, cfg.mean, cfg.std).astype(np.float64)).mean(0))
    return np.stack(probs), 1000 * decode_s / max(len(jpegs), 1)


def compare(model, jpegs: list[bytes], labels: np.ndarray | None, tta: str) -> dict:
    full, full_ms = _classify(model, jpegs, tta, draft=False)
    draft, draft_ms = _classify(model, jpegs, tta, draft=True)
    top_full, top_draft = full.argmax(1), draft.argmax(1)
    row = {"tta": tta, "images": len(jpegs), "agreement_pct": 100 * float(np.mean(top_full == top_draft)),
           "max_top1_prob_change": float(np.max(np.abs(full.max(1) - draft[np.arange(len(draft)), top_full]))),
           "decode_ms_full": full_ms, "decode_ms_draft": draft_ms,
           "top1_full": None, "top1_draft": None}
    if labels is not None:
        row.update(top1_full=100 * float(np.mean(top_full == labels)), top1_draft=100 * float(np.mean(top_draft == labels)))
    return row


def skimage_photos(quality: int) -> list[bytes]:
    try:
        from skimage import data
    except ImportError:
        return []
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    return [_jpeg(Image.fromarray(getattr(data, n)()), 1, quality) for n in names if hasattr(data, n)]


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="bench/draft.py", description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", help="artifact directory (manifest.json)")
    p.add_argument("--dataset", help="labelled dataset (default: the manifest's eval dataset)")
    p.add_argument("--upscale", type=int, default=8, help="JPEG side as a multiple of the image's (default 8)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--limit", type=int, help="at most this many labelled images")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "draft.json"))
    args = p.parse_args(argv)
    if args.upscale < 1 or not 1 <= args.quality <= 100:
        p.error(f"--upscale {args.upscale} / --quality {args.quality}: need upscale >= 1 and quality 1..100")

    from serving.engine import load_model
    from training.data import load_dataset

    model = load_model(args.artifacts, "onnxruntime")
    name = args.dataset or model.manifest.eval_dataset
    split = load_dataset(name).test.sample(args.limit)
    jpegs = [_jpeg(split.image(i), args.upscale, args.quality) for i in range(len(split))]
    photos = skimage_photos(args.quality)
    rows = [compare(model, jpegs, split.labels, tta) | {"images_from": f"{name} x{args.upscale}"}
            for tta in ("center", "ten_crop")]
    if photos:
        rows += [compare(model, photos, None, tta) | {"images_from": "scikit-image photos"} for tta in ("center", "ten_crop")]
    machine = machine_info()
    write_results(rows, Path(args.json), None, meta={"artifacts": args.artifacts, "file": model.entry.file,
                                               "preprocess": model.manifest.preprocess, "quality": args.quality},
                  machine=machine)
    print(machine_header(machine))
    for r in rows:
        acc = (f"top-1 {r['top1_full']:.2f}% full vs {r['top1_draft']:.2f}% draft, " if r["top1_full"] is not None else "")
        print(f"{r['images_from']:>22} {r['tta']:>8}: {r['images']} images, {acc}agreement {r['agreement_pct']:.2f}%, "
              f"max top-1 prob change {r['max_top1_prob_change']:.4f}, decode+crop {r['decode_ms_full']:.2f} -> "
              f"{r['decode_ms_draft']:.2f} ms")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
