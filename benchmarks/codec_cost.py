"""What one image costs the codec, per megapixel: encode, and decode in every mode.

    python benchmarks/codec_cost.py [--model NAME_OR_PATH] [--sides 512 1024] [--threads N]
                                    [--device cpu|cuda] [--json FILE]

Users size a cluster from this (README, docs/benchmarks.md "Cost per megapixel"): seconds
per megapixel to encode and to restore, one image at a time as the pipeline's actors run
them, and the process's peak resident memory after each size (it only grows, so sides are
run in increasing order). The image is a real photo (examples/photos/life.jpg) resized to
a square of each side: the networks' cost depends on the pixel count, not on the content.
One untimed encode of a small image first loads the kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from corrdiff import DECODE_MODES, CorrDiffCodec

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "photos" / "life.jpg"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name or weights file (default: the default model)")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024], help="square image sides, px")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(codec: CorrDiffCodec, side: int) -> dict:
    image = np.asarray(Image.open(PHOTO).convert("RGB").resize((side, side), Image.BICUBIC))
    mpx = side * side / 1e6
    out: dict = {}
    row = {"side": side, "mpx": mpx}
    row["encode_s_per_mpx"] = timed(lambda: out.setdefault("e", codec.encode_detailed([image])[0]), codec.device) / mpx
    row["bpp"] = out["e"].bpp
    for mode in DECODE_MODES:
        row[f"decode_{mode}_s_per_mpx"] = timed(lambda: codec.decode([out["e"].record], mode=mode), codec.device) / mpx
    row["peak_rss_mb"] = peak_rss_mb()
    if codec.device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    codec = CorrDiffCodec.from_pretrained(args.model, device=args.device)
    codec.encode_detailed([np.zeros((64, 64, 3), np.uint8)])  # load kernels, untimed
    rows = [measure(codec, side) for side in sorted(args.sides)]
    results = {"model": args.model or "default", "model_id": codec.model_id_hex, "device": str(codec.device),
               "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
               "gpu": torch.cuda.get_device_name(0) if codec.device.type == "cuda" else None, "rows": rows}
    print(f"{results['model']} ({codec.model_id_hex}) on {codec.device}, {args.threads} thread(s); seconds per Mpx")
    print("side   encode  corrdiff  e2e     diffusion  peak RSS MB")
    for r in rows:
        print(f"{r['side']:<6} {r['encode_s_per_mpx']:<7.2f} {r['decode_corrdiff_s_per_mpx']:<9.2f} "
              f"{r['decode_e2e_s_per_mpx']:<7.2f} {r['decode_diffusion_s_per_mpx']:<10.2f} {r['peak_rss_mb']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
