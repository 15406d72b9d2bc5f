"""What tiled coding costs: rate and quality of each tiling against one whole-image tile.

    python benchmarks/tiling.py --images DIR [--model NAME_OR_PATH] [--tilings 2048/0 512/64 256/64 256/32]
                                [--threads N] [--seam-crop PNG] [--output PREFIX]

Each photo is encoded with each tiling (``tile/overlap`` in px; ``2048/0`` holds every
held-out photo in one tile: the whole-image networks) and scored as it is archived: bpp of
the whole record, PSNR and LPIPS-alex of the corrdiff reconstruction (the encoder's
simulation, which every decoder reproduces). The photos are smaller than the default tile,
so small tiles are what put seams in them; a 12 Mpx photo has the same seams per tile.
``--seam-crop`` writes a 4x magnified crop across a tile seam of the first photo (whole
image, then each tiling, side by side). Prints a table; ``--output`` also writes
PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from corrdiff import CorrDiffCodec
from corrdiff.metrics import LPIPS, psnr
from corrdiff.tiling import Tiling

SEAM_SIDE = 96  # px of the original around a seam, magnified 4x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of held-out photos")
    parser.add_argument("--model", help="bundled model name or weights file (default: the default model)")
    parser.add_argument("--tilings", nargs="+", default=["2048/0", "512/64", "256/64", "256/32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seam-crop", help="write the magnified seam crop to this PNG")
    parser.add_argument("--output", help="write PREFIX.md and PREFIX.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    codec = CorrDiffCodec.from_pretrained(args.model, device="cpu")
    lpips = LPIPS("alex")
    tilings = [Tiling(*(int(v) for v in spec.split("/"))) for spec in args.tilings]
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rows, crops = [], []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        for tiling in tilings:
            codec.tiling = tiling
            started = time.perf_counter()
            [encoded] = codec.encode_detailed([image])
            rows.append({"image": path.name, "tile": tiling.tile, "overlap": tiling.overlap, "bpp": encoded.bpp,
                         "psnr": psnr(image, encoded.reconstruction),
                         "lpips_alex": lpips(image, encoded.reconstruction),
                         "encode_s": time.perf_counter() - started})
            print(json.dumps(rows[-1]), flush=True)
            if path == paths[0]:
                crops.append(encoded.reconstruction)
    summary = []
    for tiling in tilings:
        mine = [r for r in rows if (r["tile"], r["overlap"]) == (tiling.tile, tiling.overlap)]
        summary.append({"tiling": f"{tiling.tile}/{tiling.overlap}",
                        **{k: float(np.mean([r[k] for r in mine])) for k in ("bpp", "psnr", "lpips_alex", "encode_s")}})
    print("\ntiling     bpp     PSNR dB  LPIPS-alex  encode s")
    for s in summary:
        print(f"{s['tiling']:<10} {s['bpp']:<7.4f} {s['psnr']:<8.3f} {s['lpips_alex']:<11.4f} {s['encode_s']:.1f}")
    if args.seam_crop:
        write_seam_crop(crops, tilings, Path(args.seam_crop))
    results = {"model": args.model or "default", "model_id": codec.model_id_hex, "threads": args.threads,
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "images": [p.name for p in paths],
               "summary": summary, "rows": rows}
    if args.output:
        Path(f"{args.output}.json").write_text(json.dumps(results, indent=2) + "\n")
        Path(f"{args.output}.md").write_text(markdown(results))
    return results


def write_seam_crop(crops: list[np.ndarray], tilings: list[Tiling], path: Path) -> None:
    """Around the first seam of the smallest tile: where its first two tiles overlap."""
    tile = min(t.tile for t in tilings)
    overlap = min(t.overlap for t in tilings if t.tile == tile)
    centre = tile - overlap // 2  # the middle of the first overlap, on both axes
    top = max(0, min(centre - SEAM_SIDE // 2, crops[0].shape[0] - SEAM_SIDE))
    left = max(0, min(centre - SEAM_SIDE // 2, crops[0].shape[1] - SEAM_SIDE))
    parts = [np.kron(c[top:top + SEAM_SIDE, left:left + SEAM_SIDE], np.ones((4, 4, 1), np.uint8)) for c in crops]
    gap = np.full((SEAM_SIDE * 4, 8, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([p for part in parts for p in (part, gap)][:-1], axis=1)).save(path)


def markdown(results: dict) -> str:
    lines = [f"# Tiled against whole-image coding, {results['model']} ({results['model_id']})", "",
             f"{results['date']}, CPU, {results['threads']} thread(s), `benchmarks/tiling.py`; photos: "
             f"{', '.join(results['images'])}. Tiling `tile/overlap` px; 2048/0 is one whole-image tile.", "",
             "| tiling | bpp | PSNR dB | LPIPS-alex | encode s |", "|---|---|---|---|---|"]
    lines += [f"| {s['tiling']} | {s['bpp']:.4f} | {s['psnr']:.3f} | {s['lpips_alex']:.4f} | {s['encode_s']:.1f} |"
              for s in results["summary"]]
    lines += ["", "| photo | tiling | bpp | PSNR dB | LPIPS-alex |", "|---|---|---|---|---|"]
    lines += [f"| {r['image']} | {r['tile']}/{r['overlap']} | {r['bpp']:.4f} | {r['psnr']:.3f} | {r['lpips_alex']:.4f} |"
              for r in results["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
