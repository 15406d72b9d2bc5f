"""Peak memory and time of tiled coding (format version 3) as the image grows.

    python benchmarks/memory.py [--model NAME_OR_PATH | --tiny] [--sizes 1 6 24 100]
                                [--ops encode corrdiff e2e diffusion] [--tile 512] [--overlap 64]
                                [--tile-batch 1] [--whole-at 1] [--threads N] [--device cpu|cuda]
                                [--json FILE]

Each (size, operation) runs in a fresh child process, so each peak is that operation's
alone: peak RSS (``ru_maxrss``) of the child, the RSS it had with the model loaded and
before the image existed (so "beyond the model" is what the image costs), peak device
memory on a GPU (``torch.cuda.max_memory_allocated``), and seconds per megapixel. The
image is a real photo (examples/photos/life.jpg) resized to 3:2 at each size; a decode
child reads the record its size's encode child wrote. ``--whole-at`` sizes are also
encoded and decoded with a tile that holds the whole image (the whole-image networks of
format version 1), for the time and memory it is compared with.

Goals (issue 21), printed as met or not for what was run: at most 3 GB of RSS at 24 Mpx on
a CPU; memory flat beyond the tile (growth per megapixel at most the sampler's whole-image
state, :data:`corrdiff.memory.STATE_BYTES_PER_PIXEL`, + 10 %); seconds per megapixel no worse
than whole-image coding (within 15 %: a shared machine's noise).

``--tiny``: a small random model (corrdiff.tiny_config with the score network on 4 x 4
pixel blocks and one sampler step): what the CI test (tests/test_memory.py) runs, fast
enough for 16 Mpx on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.config import DiffusionConfig, ModelConfig
from corrdiff.memory import STATE_BYTES_PER_PIXEL, tile_working_bytes
from corrdiff.tiling import Tiling

ROOT = Path(__file__).resolve().parents[1]

PHOTO = ROOT / "examples" / "photos" / "life.jpg"
OPS = ("encode", "corrdiff", "e2e", "diffusion")
RSS_GOAL_MB = 3000.0
RSS_GOAL_MPX = 24.0
TIME_TOLERANCE = 1.15
GROWTH_TOLERANCE = 1.1  # the allocator's slack, and Pillow's cached blocks from making the photo


def micro_config() -> ModelConfig:
    """tiny_config with the score network on 4 x 4 blocks and one step: for memory tests."""
    config = tiny_config()
    return dataclasses.replace(config, score=dataclasses.replace(config.score, patch_size=4),
                               diffusion=DiffusionConfig(steps=1))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def photo(mpx: float) -> np.ndarray:
    width = int(round((mpx * 1e6 * 1.5) ** 0.5))
    height = int(round(width / 1.5))
    return np.asarray(Image.open(PHOTO).convert("RGB").resize((width, height), Image.BILINEAR))


def child(args: argparse.Namespace) -> dict:
    """One operation at one size in this process: its peak and time, as JSON on stdout."""
    torch.set_num_threads(args.threads)
    if args.tiny:
        codec = CorrDiffCodec.from_config(micro_config(), device=args.device)
    else:
        codec = CorrDiffCodec.from_pretrained(args.model, device=args.device)
    codec.tiling = Tiling(args.tile, args.overlap, args.tile_batch)
    record_path = Path(args.record)
    codec.decode(codec.encode([np.zeros((64, 64, 3), np.uint8)]), mode="e2e")  # load kernels, untimed
    baseline = peak_rss_mb()
    image = photo(args.mpx) if args.op == "encode" else None
    if codec.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if args.op == "encode":
        [record] = codec.encode([image])
        record_path.write_bytes(record)
        height, width = image.shape[:2]
    else:
        record = record_path.read_bytes()
        [out] = codec.decode([record], mode=args.op)
        height, width = out.shape[:2]
    if codec.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    mpx = height * width / 1e6
    row = {"op": args.op, "mpx": mpx, "height": height, "width": width, "tile": args.tile,
           "overlap": args.overlap, "tile_batch": args.tile_batch, "s_per_mpx": seconds / mpx,
           "peak_rss_mb": peak_rss_mb(), "rss_before_image_mb": baseline, "bpp": 8 * len(record) / (height * width),
           "estimated_tile_mb": tile_working_bytes(codec.model.config, codec.tiling.tile, args.tile_batch) / 2**20}
    if codec.device.type == "cuda":
        row["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_child(args: argparse.Namespace, op: str, mpx: float, tiling: Tiling, record: Path) -> dict:
    command = [sys.executable, __file__, "--child", op, "--mpx", str(mpx), "--tile", str(tiling.tile),
               "--overlap", str(tiling.overlap), "--tile-batch", str(tiling.batch), "--record", str(record),
               "--threads", str(args.threads)]
    command += ["--tiny"] if args.tiny else (["--model", args.model] if args.model else [])
    command += ["--device", args.device] if args.device else []
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{op} at {mpx} Mpx failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def goals(rows: list[dict], whole: list[dict], ops: list[str]) -> list[dict]:
    """Each goal that what was run can judge, with its numbers and whether it is met."""
    checks = []
    for row in rows:
        if abs(row["mpx"] - RSS_GOAL_MPX) <= 0.05 * RSS_GOAL_MPX and "peak_device_mb" not in row:  # the goal's size
            checks.append({"goal": f"{row['op']}: at most {RSS_GOAL_MB:.0f} MB RSS at {row['mpx']:.1f} Mpx",
                           "value": row["peak_rss_mb"], "met": row["peak_rss_mb"] <= RSS_GOAL_MB})
    for op in ops:
        series = sorted((r for r in rows if r["op"] == op), key=lambda r: r["mpx"])
        if len(series) >= 2:
            first, last = series[0], series[-1]
            per_mpx = (last["peak_rss_mb"] - first["peak_rss_mb"]) / (last["mpx"] - first["mpx"])
            checks.append({"goal": f"{op}: RSS growth from {first['mpx']:.1f} to {last['mpx']:.1f} Mpx at most "
                                   f"{GROWTH_TOLERANCE * STATE_BYTES_PER_PIXEL:.0f} MB/Mpx (the whole-image "
                                   f"sampler state, {STATE_BYTES_PER_PIXEL} B/px, + 10 %)",
                           "value": per_mpx, "met": per_mpx <= GROWTH_TOLERANCE * STATE_BYTES_PER_PIXEL})
    for reference in whole:
        tiled = [r for r in rows if r["op"] == reference["op"]]
        if tiled:
            best = min(r["s_per_mpx"] for r in tiled)
            checks.append({"goal": f"{reference['op']}: s/Mpx tiled ({best:.2f}, best size) within "
                                   f"{TIME_TOLERANCE:.2f}x of whole-image at {reference['mpx']:.1f} Mpx "
                                   f"({reference['s_per_mpx']:.2f})",
                           "value": best / reference["s_per_mpx"],
                           "met": best <= TIME_TOLERANCE * reference["s_per_mpx"]})
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name or weights file (default: the default model)")
    parser.add_argument("--tiny", action="store_true", help="a small random model (see above)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 6, 24, 100], help="megapixels")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--tile", type=int, default=Tiling.tile)
    parser.add_argument("--overlap", type=int, default=Tiling.overlap)
    parser.add_argument("--tile-batch", type=int, default=Tiling.batch, help="score tiles per network call")
    parser.add_argument("--whole-at", type=float, nargs="*", default=[1.0],
                        help="sizes (Mpx, at most 2048 px a side) also coded with one whole-image tile")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", choices=OPS, help=argparse.SUPPRESS)
    parser.add_argument("--mpx", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        args.op = args.child
        print(json.dumps(child(args)))
        return {}
    ops = ["encode"] + [op for op in args.ops if op != "encode"]  # decodes need the record
    rows, whole = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for mpx in sorted(args.sizes):
            record = Path(tmp) / f"{mpx}.cdar"
            for op in ops:
                rows.append(run_child(args, op, mpx, Tiling(args.tile, args.overlap, args.tile_batch), record))
                print(json.dumps(rows[-1]), flush=True)
        for mpx in args.whole_at:
            record = Path(tmp) / f"whole-{mpx}.cdar"
            for op in ops:
                whole.append(run_child(args, op, mpx, Tiling(2048, 0), record))
                print(json.dumps({**whole[-1], "whole_image": True}), flush=True)
    checks = goals(rows, whole, ops)
    results = {"model": "tiny (random)" if args.tiny else args.model or "default", "threads": args.threads,
               "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
               "torch": torch.__version__, "platform": platform.platform(), "rows": rows, "whole_image": whole,
               "goals": checks}
    print(f"\n{results['model']} on {results['device']}, {args.threads} thread(s), tile {args.tile} overlap "
          f"{args.overlap}, {args.tile_batch} tile(s) per call")
    print("op         Mpx     s/Mpx   peak RSS MB  before image MB  peak device MB")
    for r in rows + [dict(w, op=w["op"] + "*") for w in whole]:
        print(f"{r['op']:<10} {r['mpx']:<7.2f} {r['s_per_mpx']:<7.2f} {r['peak_rss_mb']:<12.0f} "
              f"{r['rss_before_image_mb']:<16.0f} {r.get('peak_device_mb', float('nan')):.0f}")
    print("(* one whole-image tile)\n")
    for check in checks:
        print(f"{'MET    ' if check['met'] else 'NOT MET'}  {check['goal']}: {check['value']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
