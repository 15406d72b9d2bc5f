"""What a quality floor costs in bytes, and what it buys in the worst images' quality.

    python benchmarks/floor.py --images DIR [--model NAME_OR_PATH] [--psnr 30] [--lpips 0.2]
        [--fallback avif] [--output PREFIX]

Every image of ``--images`` (decoded under the archive's colour policy,
``pipeline.images.decode_image``) is encoded once by CorrDiff (the default model unless
``--model``) and measured against its original, then stored four ways, with the very
functions the compress job's encode stage uses (``corrdiff.floor``):

- **corrdiff only**: no floor, what an archive without one holds;
- **fallback only**: every image by the fallback codec, at the smallest setting meeting
  the floor (lossless PNG where none does);
- **mixed, choose: corrdiff**: CorrDiff's record where it meets the floor, else the fallback's;
- **mixed, choose: smaller**: the smaller record of the two that meet the floor.

For each: total bytes of the records, mean bpp, the 5th-percentile PSNR and the median
LPIPS-alex of what a restore gives (every record's decoded pixels, measured at encode
time, as the archive's columns hold them), the images below the floor, and the share of
records the fallback holds. Prints a table; with ``--output`` also PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from corrdiff import CorrDiffCodec
from corrdiff.floor import (CORRDIFF, Floor, FloorMeter, StoredImage, smallest_meeting,
                            store_meeting)
from corrdiff.metrics import LPIPS
from pipeline.images import IMAGE_EXTENSIONS, decode_image

ARCHIVES = ("corrdiff only", "fallback only", "mixed, choose: corrdiff", "mixed, choose: smaller")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of held-out photos (scripts/heldout_photos.py)")
    parser.add_argument("--model", help="model name or weights file (default: the default model)")
    parser.add_argument("--psnr", type=float, default=30.0)
    parser.add_argument("--lpips", type=float, default=0.2)
    parser.add_argument("--fallback", default="avif", choices=["avif", "jxl", "png"])
    parser.add_argument("--output", help="write PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    codec = CorrDiffCodec.from_pretrained(args.model, device="cpu")
    lpips = LPIPS("alex")
    floor = Floor(psnr=args.psnr, lpips=args.lpips)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    stored: dict[str, list[StoredImage]] = {name: [] for name in ARCHIVES}
    pixels = 0
    started = time.time()
    for path in paths:
        image = decode_image(path.read_bytes())
        pixels += image.shape[0] * image.shape[1]
        meter = FloorMeter(image, lpips)
        [encoded] = codec.encode_detailed([image])
        codec.verify(encoded, encoded.record)
        corrdiff = StoredImage(CORRDIFF, encoded.record, None, encoded.reconstruction, meter(encoded.reconstruction))
        fallback = smallest_meeting(image, args.fallback, meter, floor)
        stored["corrdiff only"].append(corrdiff)
        stored["fallback only"].append(fallback)
        stored["mixed, choose: corrdiff"].append(store_meeting(image, corrdiff, floor, args.fallback, meter))
        stored["mixed, choose: smaller"].append(store_meeting(image, corrdiff, floor, args.fallback, meter,
                                                              smaller=True))
        print(f"{path.name}: corrdiff {len(encoded.record)} B, PSNR {corrdiff.quality.psnr:.2f}, "
              f"LPIPS {corrdiff.quality.lpips:.4f}; {fallback.codec} q{fallback.setting} {len(fallback.data)} B, "
              f"PSNR {fallback.quality.psnr:.2f}, LPIPS {fallback.quality.lpips:.4f}", flush=True)
    rows = [_row(name, records, pixels, floor) for name, records in stored.items()]
    result = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": codec.model_id_hex,
              "images": [p.name for p in paths], "pixels": pixels, "floor": {"psnr": args.psnr, "lpips": args.lpips},
              "fallback": args.fallback, "seconds": round(time.time() - started, 1), "archives": rows}
    table = _table(rows)
    print(table)
    if args.output:
        Path(args.output + ".md").write_text(table + "\n")
        Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _row(name: str, records: list[StoredImage], pixels: int, floor: Floor) -> dict:
    psnrs = np.array([r.quality.psnr for r in records])
    lpipses = np.array([r.quality.lpips for r in records])
    total = sum(len(r.data) for r in records)
    return {"archive": name, "bytes": total, "bpp": 8 * total / pixels,
            "psnr_p5": float(np.percentile(psnrs, 5)), "lpips_median": float(np.median(lpipses)),
            "below_floor": sum(not floor.met_by(r.quality) for r in records),
            "fallback_share": sum(r.codec != CORRDIFF for r in records) / len(records),
            "codecs": {c: sum(r.codec == c for r in records) for c in sorted({r.codec for r in records})}}


def _table(rows: list[dict]) -> str:
    lines = ["| archive | bytes | mean bpp | 5th-percentile PSNR (dB) | median LPIPS | below the floor | "
             "fallback share | records by codec |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['archive']} | {r['bytes']:,} | {r['bpp']:.3f} | {r['psnr_p5']:.2f} | "
                     f"{r['lpips_median']:.4f} | {r['below_floor']} | {r['fallback_share']:.0%} | "
                     + ", ".join(f"{c} {n}" for c, n in r["codecs"].items()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
