"""Throughput of the Ray compress pipeline against a bare encode loop, on the same images.

    python benchmarks/throughput.py [--model NAME_OR_PATH] [--images DIR] [--repeat N] [--bare-only]

The images of DIR (default examples/photos) are copied N times (default 4: 24 images from
the 6 example photos) into a temporary folder, then compressed twice:

(a) bare loop: in this process, one image at a time: read the file, decode it with
    pipeline.images.decode_image, CorrDiffCodec.encode_detailed; torch uses every core.
    The model is loaded and one image encoded before the clock starts.
(b) pipeline: pipeline.compress.run_compress into a temporary archive, on a local Ray
    cluster started in this process (ray.init is timed apart and excluded). Each
    run_compress call starts its own encode actors (a new process that imports torch and
    loads the model), so the script times a 1-image run as well: its time is the per-run
    fixed cost, and (N - 1) / (t_N - t_1) is the pipeline's steady-state rate. A first
    1-image run, timed but not counted, starts Ray's task worker processes.

With --bare-only, or where Ray cannot be imported (a GPU machine may lack it), only (a)
runs. The JSON file (--json) is written after (a) and again after (b), so a run cut short
during (b) still leaves (a)'s numbers.

Without --model, a tiny randomly initialised model (corrdiff.tiny_config()) is used: its
encode is so cheap that the pipeline's fixed costs dominate. With a real model, encoding
dominates and the ratio moves towards what the resources allow.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="shipped model name or weights file (default: a tiny random model)")
    parser.add_argument("--images", default=str(ROOT / "examples" / "photos"), help="folder of images")
    parser.add_argument("--repeat", type=int, default=4, help="copies of each image (default 4)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (both runs)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for torch and for Ray")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--bare-only", action="store_true", help="only the bare loop (a), no Ray")
    return parser.parse_args(argv)


def make_inputs(images: Path, repeat: int, folder: Path) -> list[Path]:
    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not sources:
        raise SystemExit(f"no images in {images}")
    folder.mkdir(parents=True)
    files = []
    for r in range(repeat):
        for source in sources:
            files.append(folder / f"r{r:03d}-{source.name}")
            shutil.copy(source, files[-1])
    return files


def bare_loop(model_path: Path, files: list[Path], device: str, threads: int) -> dict:
    import torch

    from corrdiff import CorrDiffCodec
    from pipeline.images import decode_image

    torch.set_num_threads(threads)
    codec = CorrDiffCodec.from_pretrained(model_path, device=None if device == "auto" else device)
    codec.encode_detailed([decode_image(files[0].read_bytes())], seed=0)  # warm-up, not timed
    decode_s = encode_s = 0.0
    pixels = 0
    started = time.perf_counter()
    for path in files:
        t0 = time.perf_counter()
        image = decode_image(path.read_bytes())
        t1 = time.perf_counter()
        codec.encode_detailed([image], seed=0)
        t2 = time.perf_counter()
        decode_s, encode_s, pixels = decode_s + t1 - t0, encode_s + t2 - t1, pixels + image.shape[0] * image.shape[1]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "decode_seconds": decode_s, "encode_seconds": encode_s,
            "images_per_second": len(files) / seconds, "torch_threads": torch.get_num_threads(),
            "device": str(codec.device), "steps": codec.default_steps, "mean_megapixels": pixels / len(files) / 1e6}


def pipeline_runs(model_path: Path, files: list[Path], work: Path, device: str, cpus: int) -> dict:
    import pyarrow.dataset as pads
    import ray
    from ray.data import DataContext

    from pipeline.compress import CodecSettings, CompressConfig, run_compress
    from pipeline.resources import ResourceSettings, plan_resources
    from pipeline.sources import SourceConfig

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    init_s = time.perf_counter() - started
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray configures it at init: quiet it after
    plan = plan_resources(ResourceSettings(), ray.cluster_resources())

    def run(name: str, inputs: list[Path]) -> tuple[float, Path]:
        folder = work / f"in-{name}"
        folder.mkdir()
        for path in inputs:
            os.link(path, folder / path.name)
        archive = work / f"archive-{name}"
        config = CompressConfig(input=SourceConfig(url=str(folder)), output=str(archive),
                                codec=CodecSettings(model=str(model_path), device=device), job_id=name)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # run_compress's own progress line
            summary = run_compress(config)
        seconds = time.perf_counter() - t0
        assert summary["ok"] == len(inputs) == summary["rows"], summary
        return seconds, archive

    try:
        first_s, _ = run("warmup", files[:1])
        one_s, _ = run("one", files[1:2])
        full_s, archive = run("full", files)
        encode_s = sum(pads.dataset(str(archive), format="parquet").to_table(columns=["encode_seconds"])
                       .column("encode_seconds").to_pylist())
    finally:
        ray.shutdown()
    n = len(files)
    return {
        "ray_init_seconds": init_s, "first_1_image_run_seconds": first_s, "one_image_run_seconds": one_s,
        "seconds": full_s, "images_per_second": n / full_s,
        "steady_images_per_second": (n - 1) / (full_s - one_s) if full_s > one_s else None,
        "actor_encode_seconds": encode_s,
        "actors": plan.actors, "actor_cpus": plan.actor.num_cpus, "actor_torch_threads": plan.torch_threads,
    }


def machine_facts(cpus: int) -> dict:
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpus_used": cpus, "torch": torch.__version__, "ray": ray_version, "gpu": gpu}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit / torch_geometric noise
    from corrdiff import CorrDiffCodec, tiny_config
    from corrdiff import weights

    with tempfile.TemporaryDirectory(prefix="corrdiff-bench-") as tmp:
        work = Path(tmp)
        if args.model:
            model_path, model_note = weights.resolve(args.model), args.model
        else:
            model_path = work / "tiny.safetensors"
            CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu").save_pretrained(model_path)
            model_note = ("tiny random model (corrdiff.tiny_config()): encoding is very cheap, so fixed "
                          "overheads look large; with a real model encode time dominates")
        files = make_inputs(Path(args.images), args.repeat, work / "images")
        if len(files) < 2:
            raise SystemExit("need at least 2 images (raise --repeat)")
        facts = machine_facts(args.num_cpus)
        bare = bare_loop(model_path, files, args.device, args.num_cpus)
        results = {"machine": facts, "model": model_note, "images": len(files), "images_dir": args.images,
                   "repeat": args.repeat, "bare": bare, "pipeline": None, "ratio": None, "steady_ratio": None}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        if not args.bare_only and facts["ray"] is not None:
            piped = pipeline_runs(model_path, files, work, args.device, args.num_cpus)
            results |= {"pipeline": piped, "ratio": piped["images_per_second"] / bare["images_per_second"],
                        "steady_ratio": (piped["steady_images_per_second"] / bare["images_per_second"]
                                         if piped["steady_images_per_second"] else None)}

    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(r: dict) -> str:
    m, b, p = r["machine"], r["bare"], r["pipeline"]
    head = [
        f"machine     {m['cpu_count']} CPUs ({m['cpus_used']} used), GPU: {m['gpu'] or 'none'}; "
        f"python {m['python']}, torch {m['torch']}, ray {m['ray'] or 'not installed'}",
        f"model       {r['model']}",
        f"images      {r['images']} ({r['images_dir']} x {r['repeat']}), mean {b['mean_megapixels']:.3f} Mpx, "
        f"{b['steps']} sampler steps, device {b['device']}",
        "",
        f"(a) bare loop      {b['images_per_second']:8.3f} images/s   {b['seconds']:.2f} s "
        f"(decode {b['decode_seconds']:.2f} s, encode {b['encode_seconds']:.2f} s; torch threads {b['torch_threads']})",
    ]
    if p is None:
        return "\n".join(head + ["(b) pipeline       not run (--bare-only, or Ray not installed)"])
    steady = p["steady_images_per_second"]
    lines = head + [
        f"(b) pipeline       {p['images_per_second']:8.3f} images/s   {p['seconds']:.2f} s end to end, "
        f"actor start-up included ({p['actors']} encode actor(s) x {p['actor_torch_threads']} torch "
        f"threads, {p['actor_cpus']} CPU reserved each)",
        "    steady state   " + (f"{steady:8.3f} images/s   (N-1)/(t_N - t_1), per-run fixed cost removed"
                                  if steady else "       -   (the 1-image run took as long as the full run)"),
        f"    fixed cost     {p['one_image_run_seconds']:.2f} s per run (a 1-image run: plan, actor start, "
        f"model load, write, summary)",
        f"    first run      {p['first_1_image_run_seconds']:.2f} s (1 image, also starts Ray's worker processes; "
        f"not counted)",
        f"    ray.init       {p['ray_init_seconds']:.2f} s (not counted)",
        f"    encode in actors {p['actor_encode_seconds']:.2f} s in all (the archive's encode_seconds)",
        "",
        f"ratio pipeline/bare   {r['ratio']:.3f} end to end"
        + (f", {r['steady_ratio']:.3f} steady state" if r["steady_ratio"] else ""),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
