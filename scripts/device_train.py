#!/usr/bin/env python3
"""The body of one prepared GPU call (scripts/device_train.sh runs it; docs/training.md).

    python scripts/device_train.py CONFIG [--seconds 360] [--data data/pack] [--out $OUT]

Everything it writes goes to ``--out`` ($OUT on the device machine), in at most 7 files,
none larger than ``--max-file-mib``, so that all of it comes back:

    device.log              this whole output (written by device_train.sh's tee)
    log.csv                 training log: loss, bpp, PSNR, LPIPS, steps/s, GPU memory
    <name>.safetensors      the exported model, rewritten at every checkpoint (every minute)
    checkpoint.pt           the resumable state (+ checkpoint-optimizer-<i>.pt shards)
    results.json            environment, training summary, checks, timings, benchmark

Stages, each inside one wall clock (``--total-seconds``, default ``--seconds`` + 130):

1. environment (fails fast, exit 3): versions, the GPU, which optional packages import;
   compressai's entropy coder round-trips, and the codec round-trips an image with its
   decode equal to ``encode_detailed``'s reconstruction; LPIPS-alex is installed from the
   carried backbone where the machine lacks it, and checked against the value computed
   where it was prepared; the data folder holds images;
2. training: ``jobs/train.py`` with ``--max-seconds SECONDS``, ``--lpips optional``,
   ``--checkpoint-seconds 60 --export-checkpoints`` and ``--max-file-mib``, in a child
   process with a hard limit;
3. checks of the exported model: it loads, round-trips a real photo (decode = encode's
   reconstruction), its latent decodes identically on the CPU (the device-independent
   entropy path), and its encode and decode time per megapixel on this device;
4. ``benchmarks/throughput.py`` on ~1 Mpx photos made from the training data: the bare
   codec, and the Ray pipeline where Ray imports (``--benchmark auto``), in what time is left.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LPIPS_FEATURES = "lpips-alexnet-features-fp16.safetensors"  # written by scripts/device_prepare.py
LPIPS_CHECK = "lpips-check.json"
OPTIONAL_MODULES = ("compressai", "lpips", "pytorch_msssim", "ray", "pyarrow", "fsspec", "PIL", "safetensors",
                    "yaml", "skimage", "torchvision", "pydantic", "tqdm")
CHECK_PHOTO = ROOT / "examples" / "photos" / "life.jpg"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config (configs/train/gpu-*.yaml)")
    parser.add_argument("--seconds", type=float, default=360.0, help="training budget (jobs/train.py --max-seconds)")
    parser.add_argument("--total-seconds", type=float, help="the whole call's budget (default: --seconds + 130)")
    parser.add_argument("--data", default="data/pack", help="training photos (carried: data/pack)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/device"), help="output folder ($OUT)")
    parser.add_argument("--wheels", default=".whl", help="carried wheels and LPIPS backbone (scripts/device_prepare.py)")
    parser.add_argument("--max-file-mib", type=float, default=15.5, help="largest file written to --out")
    parser.add_argument("--checkpoint-seconds", type=float, default=60.0, help="checkpoint (and export) this often")
    parser.add_argument("--benchmark", choices=["auto", "full", "bare", "none"], default="auto",
                        help="auto: the Ray pipeline too where Ray imports")
    parser.add_argument("--bench-megapixels", type=float, default=1.0, help="size of the benchmark photos")
    parser.add_argument("--bench-photos", type=int, default=6, help="distinct benchmark photos")
    parser.add_argument("--bench-repeat", type=int, default=4, help="copies of each (throughput.py --repeat)")
    parser.add_argument("--bench-cpus", type=int, help="CPUs for the benchmark (throughput.py --num-cpus)")
    parser.add_argument("--time-megapixels", type=float, default=1.0,
                        help="size of the image whose encode and decode are timed on the device")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this process (the CPU rehearsal: 1)")
    return parser.parse_args(argv)


class Clock:
    def __init__(self, total: float) -> None:
        self.start, self.total = time.monotonic(), total

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


def say(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------- 1. environment
def environment(wheels: Path) -> dict:
    import numpy as np
    import torch

    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "numpy": np.__version__, "cuda": torch.version.cuda,
             "gpu": None, "gpu_memory_gib": None, "modules": {}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"], facts["gpu_memory_gib"] = props.name, round(props.total_memory / 2**30, 1)
    for name in OPTIONAL_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
            facts["modules"][name] = getattr(module, "__version__", "present")
        except Exception as error:  # noqa: BLE001 - any failure to import is the fact to record
            facts["modules"][name] = f"absent ({type(error).__name__}: {error})"[:200]
    try:
        from PIL import features

        facts["pil_webp"] = bool(features.check("webp"))
    except Exception:  # noqa: BLE001
        facts["pil_webp"] = False
    facts["wheels"] = sorted(p.name for p in wheels.glob("*")) if wheels.is_dir() else []
    return facts


def check_entropy_coding(device: str) -> dict:
    """compressai's rANS coder round-trips, and so does the codec, on this device."""
    import numpy as np
    import torch
    from compressai.entropy_models import EntropyBottleneck
    from PIL import Image

    from corrdiff import CorrDiffCodec, tiny_config

    started = time.monotonic()
    torch.manual_seed(0)
    bottleneck = EntropyBottleneck(4)
    bottleneck.update(force=True)
    x = torch.randn(2, 4, 8, 8) * 3
    decoded = bottleneck.decompress(bottleneck.compress(x), x.shape[-2:])
    if not float((decoded - x).abs().max()) <= 0.5 + 1e-5:
        raise RuntimeError("compressai EntropyBottleneck compress/decompress does not round-trip")
    codec = CorrDiffCodec.from_config(tiny_config(), seed=0, device=device)
    image = np.asarray(Image.open(CHECK_PHOTO).convert("RGB"))[:96, :160]
    [encoded] = codec.encode_detailed([image])
    [restored] = codec.decode([encoded.record])
    if not np.array_equal(restored, encoded.reconstruction):
        raise RuntimeError("the codec's decode differs from encode_detailed's reconstruction")
    return {"compressai_round_trip": True, "codec_round_trip": True, "device": device,
            "record_bytes": len(encoded.record), "seconds": round(time.monotonic() - started, 2)}


def install_lpips_backbone(wheels: Path) -> dict:
    """Make LPIPS-alex loadable: where torch's cache lacks the AlexNet backbone, rebuild its
    file from the carried fp16 features (scripts/device_prepare.py) in a private TORCH_HOME,
    then check one LPIPS value against the one computed where the features were prepared."""
    import torch

    result: dict = {"available": False}
    try:
        import lpips  # noqa: F401

        from corrdiff.metrics import lpips_backbone_path
    except ImportError as error:
        result["why"] = f"ImportError: {error}"
        return result
    source = wheels / LPIPS_FEATURES
    if not lpips_backbone_path("alex").is_file():
        if not source.is_file():
            result["why"] = f"no AlexNet backbone in torch's cache and no {source}"
            return result
        os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="corrdiff-torch-home-")
        write_alexnet_backbone(source, lpips_backbone_path("alex"))
        result["installed_from"] = str(source)
    result["backbone"] = str(lpips_backbone_path("alex"))
    check_file = wheels / LPIPS_CHECK
    if check_file.is_file():
        expected = json.loads(check_file.read_text())
        measured = lpips_check_value("cuda" if torch.cuda.is_available() else "cpu")
        result |= {"check_expected": expected["value"], "check_measured": measured}
        if abs(measured - expected["value"]) > 1e-3:
            result["why"] = f"LPIPS check value {measured:.5f}, expected {expected['value']:.5f}"
            return result
    result["available"] = True
    return result


def write_alexnet_backbone(features_file: Path, target: Path) -> None:
    """torchvision's AlexNet checkpoint with the carried features and a zero classifier
    (stored as one broadcast zero: LPIPS never runs it, torchvision only loads it)."""
    import torch
    import torchvision
    from safetensors.torch import load_file

    features = load_file(str(features_file))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    missing = [k for k in shapes if k.startswith("features.") and k not in features]
    if missing:
        raise ValueError(f"{features_file} lacks {missing}")
    state = {k: features[k].float() if k in features else torch.zeros(1).expand(shape) for k, shape in shapes.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)


def lpips_check_value(device: str) -> float:
    """LPIPS-alex between the check photo and a blurred copy (scripts/device_prepare.py
    records the same number computed with the same backbone file)."""
    import numpy as np
    from PIL import Image

    from corrdiff.metrics import LPIPS

    photo = Image.open(CHECK_PHOTO).convert("RGB")
    blurred = photo.resize((photo.width // 4, photo.height // 4), Image.Resampling.BILINEAR).resize(photo.size)
    return float(LPIPS("alex", device=device)(np.asarray(photo), np.asarray(blurred)))


def check_data(data: Path) -> dict:
    from pipeline.image_folder import list_images

    files = list_images(str(data))
    return {"folder": str(data), "images": len(files), "manifest": (data / "MANIFEST.csv").is_file(),
            "mib": round(sum(Path(f.removeprefix("file://")).stat().st_size for f in files) / 2**20, 2)}


# ------------------------------------------------------------------------- 2. training
def run_training(args: argparse.Namespace, out: Path, timeout: float) -> dict:
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", args.config, "--data", args.data,
               "--output", str(out), "--max-seconds", str(args.seconds), "--lpips", "optional",
               "--checkpoint-seconds", str(args.checkpoint_seconds), "--export-checkpoints",
               "--max-file-mib", str(args.max_file_mib)]
    code, seconds = run_timed(command, timeout)
    return {"exit": code, "seconds": seconds, "command": command[1:]}


def run_timed(command: list[str], timeout: float) -> tuple[int | str, float]:
    """Run a stage's subprocess in the repository root: its exit code (or why it was
    stopped at ``timeout``) and its wall time."""
    say("$ " + " ".join(command))
    started = time.monotonic()
    try:
        code: int | str = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = f"killed after {timeout:.0f} s, its time limit"
    return code, round(time.monotonic() - started, 1)


def summarize_log(path: Path, phases: list[dict]) -> list[dict]:
    """Per phase of the run: steps, seconds, steps/s, peak GPU memory and the last row's numbers."""
    if not path.is_file():
        return []
    rows = list(csv.DictReader(open(path, newline="")))
    summary, current, previous_step = [], None, None
    for row in rows:
        step = int(row["step"])
        if current is None or row["phase"] != current["phase"] or step <= previous_step:
            current = {"phase": row["phase"], "rows": 0}
            summary.append(current)
        current["rows"] += 1
        current["steps"], current["seconds"] = step, float(row["seconds"])
        current["last"] = {k: float(v) for k, v in row.items()
                           if v not in ("", None) and k in ("loss", "bpp", "psnr", "e2e_psnr", "lpips", "gamma", "lr")}
        if row.get("gpu_mem_gib"):
            current["gpu_mem_gib"] = max(current.get("gpu_mem_gib", 0.0), float(row["gpu_mem_gib"]))
        previous_step = step
    for index, item in enumerate(summary):
        if len(summary) == len(phases):  # else a phase was skipped (no LPIPS): which is which is in the log
            item["config"] = phases[index]
        item["steps_per_s"] = round(item["steps"] / item["seconds"], 2) if item["seconds"] else None
    return summary


# ------------------------------------------------------------------------- 3. checks
# Score tiles per network call timed on the device beside the default (one): whether a GPU
# gains from batches of tiles, and how much (format 3 keeps the batch in each record;
# docs/method.md "Batches of tiles" holds the CPU's numbers and waits for these).
TIMED_TILE_BATCHES = (2, 4, 16)


def check_model(model_path: Path, device: str, megapixels: float) -> dict:
    """Load the exported model, round-trip a real photo on ``device``, decode its latent on
    the CPU as well, and time encode and decode per megapixel on ``device``, one tile per
    network call and then :data:`TIMED_TILE_BATCHES`."""
    import numpy as np
    import torch
    from PIL import Image

    from corrdiff import CorrDiffCodec
    from corrdiff.latent_codec import TiledBitstreams
    from corrdiff.tiling import Tiling

    codec = CorrDiffCodec.from_pretrained(model_path, device=device)
    photo = np.asarray(Image.open(CHECK_PHOTO).convert("RGB"))
    [encoded] = codec.encode_detailed([photo])
    [restored] = codec.decode([encoded.record])
    result = {"model_id": codec.model_id_hex, "photo": CHECK_PHOTO.name, "bpp": round(encoded.bpp, 4),
              "decode_equals_encode": bool(np.array_equal(restored, encoded.reconstruction)),
              "psnr_corrdiff": round(_psnr(photo, restored), 3),
              "psnr_e2e": round(_psnr(photo, codec.decode([encoded.record], mode="e2e")[0]), 3)}
    record = codec.parse(encoded.record)
    streams = TiledBitstreams(z=record.z_string, y=list(record.y_strings))
    here = codec.model.latent.decompress_tiled(streams, record.padded_size, record.tile, codec.device).cpu()
    cpu = CorrDiffCodec.from_pretrained(model_path, device="cpu")
    on_cpu = cpu.model.latent.decompress_tiled(streams, record.padded_size, record.tile, cpu.device)
    result["latent_equal_on_cpu"] = bool(torch.equal(here, on_cpu))
    result["cpu_decode_max_pixel_difference"] = int(np.abs(cpu.decode([encoded.record])[0].astype(int) -
                                                           restored.astype(int)).max())
    big = _megapixel_image(photo, megapixels)
    codec.encode_detailed([big[:256, :256]])  # warm-up (kernels, allocator)
    result |= {"timed_megapixels": round(big.shape[0] * big.shape[1] / 1e6, 3), "timing_device": device,
               **_timed(codec, big), "tile_batches": {}}
    for batch in TIMED_TILE_BATCHES:
        codec.tiling = Tiling(codec.tiling.tile, codec.tiling.overlap, batch)
        try:
            result["tile_batches"][str(batch)] = _timed(codec, big)
        except Exception as error:  # noqa: BLE001 - keep the checks above and the other batches
            result["tile_batches"][str(batch)] = {"failed": f"{type(error).__name__}: {error}",
                                                  "decode_equals_encode": False}
    return result


def _timed(codec, image) -> dict:
    """Seconds per megapixel of encoding ``image`` and of decoding its record on the codec's
    device, whether the decode gave the encoder's pixels, and the peak device memory."""
    import numpy as np
    import torch

    cuda = codec.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    [encoded] = codec.encode_detailed([image])
    encode_s = time.monotonic() - started
    started = time.monotonic()
    [decoded] = codec.decode([encoded.record])
    if cuda:
        torch.cuda.synchronize()
    decode_s = time.monotonic() - started
    mpx = image.shape[0] * image.shape[1] / 1e6
    return {"encode_s_per_mpx": round(encode_s / mpx, 3), "decode_s_per_mpx": round(decode_s / mpx, 3),
            "decode_equals_encode": bool(np.array_equal(decoded, encoded.reconstruction)),
            "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _megapixel_image(image, megapixels: float):
    """``image`` resized (Lanczos) to about ``megapixels`` at its aspect ratio."""
    import numpy as np
    from PIL import Image

    height, width = image.shape[:2]
    scale = math.sqrt(megapixels * 1e6 / (height * width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------- 4. benchmark
def benchmark_photos(data: Path, folder: Path, count: int, megapixels: float) -> list[Path]:
    """``count`` photos of about ``megapixels`` each: the centre of the largest training
    views (or the view resized, if smaller), as high-quality JPEG."""
    from PIL import Image

    from pipeline.image_folder import load_images

    folder.mkdir(parents=True, exist_ok=True)
    images = sorted(load_images(str(data), 64), key=lambda item: -item[1].shape[0] * item[1].shape[1])
    side_w, side_h = round(math.sqrt(megapixels * 1e6 * 4 / 3)), round(math.sqrt(megapixels * 1e6 * 3 / 4))
    written = []
    for index, (_, image) in enumerate(images[:count]):
        height, width = image.shape[:2]
        if height >= side_h and width >= side_w:
            top, left = (height - side_h) // 2, (width - side_w) // 2
            image = image[top:top + side_h, left:left + side_w]
        else:
            image = _megapixel_image(image, megapixels)
        written.append(folder / f"bench-{index:02d}.jpg")
        Image.fromarray(image).save(written[-1], quality=95)
    return written


def run_benchmark(model_path: Path, images: Path, mode: str, repeat: int, cpus: int | None, timeout: float) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="corrdiff-bench-json-")) / "throughput.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", str(model_path),
               "--images", str(images), "--repeat", str(repeat), "--json", str(scratch)]
    if cpus:
        command += ["--num-cpus", str(cpus)]
    if mode == "bare":
        command.append("--bare-only")
    code, seconds = run_timed(command, timeout)
    result = json.loads(scratch.read_text()) if scratch.is_file() else {}
    return {"exit": code, "mode": mode, "seconds": seconds, "results": result}


# ------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.total_seconds or args.seconds + 130.0)
    out, wheels, data = Path(args.out), Path(args.wheels), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": args.config, "seconds": args.seconds, "total_seconds": clock.total, "data": str(data)}

    def save() -> None:
        results["elapsed_s"] = round(clock.elapsed(), 1)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
        os.replace(tmp, out / "results.json")

    say(f"== 1. environment (+{clock.elapsed():.0f} s)")
    results["environment"] = environment(wheels)
    say(json.dumps(results["environment"], indent=1, default=str))
    save()
    import torch
    import yaml

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        results["entropy_coding"] = check_entropy_coding(device)
        results["data_check"] = check_data(data)
    except Exception as error:  # noqa: BLE001 - fail fast, with the reason in the results
        results["failed"] = f"environment: {type(error).__name__}: {error}"
        say(f"FAILED {results['failed']}")
        save()
        return 3
    results["lpips"] = install_lpips_backbone(wheels)
    say(f"entropy coding: {results['entropy_coding']}\ndata: {results['data_check']}\nLPIPS: {results['lpips']}")
    save()

    say(f"== 2. training for {args.seconds:.0f} s (+{clock.elapsed():.0f} s)")
    config = yaml.safe_load(Path(args.config).read_text())
    model_path = out / f"{config['name']}.safetensors"
    results["training"] = run_training(args, out, timeout=max(30.0, min(args.seconds + 75.0, clock.left() - 20.0)))
    results["training"]["phases"] = summarize_log(out / "log.csv", config.get("phases", []))
    save()
    if not model_path.is_file():
        results["failed"] = "training wrote no model"
        say(f"FAILED {results['failed']}")
        save()
        return 4

    say(f"== 3. checks of {model_path.name} (+{clock.elapsed():.0f} s)")
    try:
        results["model_check"] = check_model(model_path, device, args.time_megapixels)
    except Exception as error:  # noqa: BLE001 - record it and still benchmark
        results["model_check"] = {"failed": f"{type(error).__name__}: {error}"}
    say(json.dumps(results["model_check"], indent=1))
    save()

    mode = args.benchmark
    if mode == "auto":
        mode = "full" if not str(results["environment"]["modules"].get("ray", "absent")).startswith("absent") else "bare"
    if mode != "none" and clock.left() > 10:
        say(f"== 4. benchmark ({mode}, {clock.left():.0f} s left; +{clock.elapsed():.0f} s)")
        photos = benchmark_photos(data, Path(tempfile.mkdtemp(prefix="corrdiff-bench-")), args.bench_photos,
                                  args.bench_megapixels)
        results["benchmark"] = run_benchmark(model_path, photos[0].parent, mode, args.bench_repeat, args.bench_cpus,
                                             timeout=clock.left() - 5.0)
    else:
        results["benchmark"] = {"skipped": f"mode {mode}, {clock.left():.0f} s left"}
    save()
    report(results, out)
    check = results["model_check"]
    batches = check.get("tile_batches", {}).values()
    round_trips = [check.get("decode_equals_encode"), *(timed["decode_equals_encode"] for timed in batches)]
    return 0 if results["training"]["exit"] == 0 and all(round_trips) else 5


def report(results: dict, out: Path) -> None:
    """The short table the device tool's output_tail shows."""
    env, check = results["environment"], results.get("model_check", {})
    say(f"== summary ({results['elapsed_s']} s of {results['total_seconds']:.0f})")
    say(f"device     {env['gpu'] or 'cpu'}; torch {env['torch']}, numpy {env['numpy']}, python {env['python']}")
    say(f"LPIPS      {'yes' if results['lpips'].get('available') else 'NO: ' + results['lpips'].get('why', '?')}")
    say(f"training   exit {results['training']['exit']}, {results['training']['seconds']} s")
    for phase in results["training"].get("phases", []):
        last = phase.get("last", {})
        say(f"  phase {phase['phase']}: {phase['steps']} steps in {phase['seconds']} s ({phase['steps_per_s']}/s), "
            + ", ".join(f"{k} {v}" for k, v in last.items() if k != "lr")
            + (f", {phase['gpu_mem_gib']} GiB" if "gpu_mem_gib" in phase else ""))
    say("model      " + ", ".join(f"{k} {v}" for k, v in check.items()))
    bench = results.get("benchmark", {}).get("results", {})
    if bench:
        line = f"bare {bench['bare']['images_per_second']:.2f} images/s"
        if bench.get("pipeline"):
            p = bench["pipeline"]
            line += (f"; pipeline {p['images_per_second']:.2f} images/s end to end, steady "
                     f"{p.get('steady_images_per_second')}, {p.get('actors')} actor(s)")
        say(f"benchmark  {line} ({bench['images']} images of {bench['bare']['mean_megapixels']:.2f} Mpx)")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    say("files      " + ", ".join(f"{p.relative_to(out)} {p.stat().st_size / 2**20:.2f} MiB" for p in files))


if __name__ == "__main__":
    sys.exit(main())
