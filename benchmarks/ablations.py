"""Inference-time ablations of CorrDiff: step count, how gamma is fitted, where sampling starts.

    python benchmarks/ablations.py --model NAME_OR_PATH --images DIR --output PREFIX
        [--steps 4,8,16] [--perceptual-weights 0.1,1.0] [--t-max 0.4,0.6]
        [--max-images N] [--note TEXT]

docs/method.md marks choices as "to measure" that need no retraining, only encodes of a
trained model, so this script measures them on held-out photos (an empty list skips an
ablation; the model's default step count always runs, as the reference of the others):

1. **Step count.** Every image is encoded with each of ``--steps`` sampler steps and the
   closed-form MSE gamma (the codec's default fitter). Each step adds a float16 gamma to
   the record and a score-network pass to encode and decode. To show what the correction
   buys at each step count, the same record is also decoded with gamma = 0 (plain DDIM,
   ``decode(mode="diffusion", steps=s)``); D's own output (``mode="e2e"``, the same at
   every step count) is given once per image as the reference.
2. **Gamma fitting**, at the model's default step count: the closed form against the
   closed form refined by Adam on MSE + w * LPIPS-alex (``GammaFitter`` with its default
   refinement, 10 steps at lr 0.1, keeping the best value), for each w of
   ``--perceptual-weights``. The refinement exists to lower LPIPS; it costs encode time
   only (the decoder reads the gammas), which is what the table weighs.
3. **Start of sampling**, at the default step count and closed-form gamma: the sampler
   starts from x_e noised to level t_max (the model's own value, 0.8 in the shipped
   models, is the reference row) and spreads its steps over (0, t_max]. The score network
   was trained on t in (0, t_max], so only values below the model's are in distribution.
   A different t_max is a different decoder: the variant's config, and so its model id,
   differ, and its records only decode with it.

How it is measured: images at full size, one at a time, seed 0, on the CPU with one torch
thread. bpp is the whole record's (header and checksum included). PSNR (RGB, peak 255) and
LPIPS-alex come from ``corrdiff.metrics``, on the corrdiff reconstruction that
``encode_detailed`` returns, which is exactly what ``decode`` returns (asserted once,
before any clock starts; that encode is also the warm-up). Encode seconds are the wall
clock of ``encode_detailed`` per image; metrics and extra decodes are outside the clock.
The closed-form row of (2) is the default-step run of (1), not a second encode. Means are
over images (PSNR: a mean of dB). Timings depend on the machine and its load: ``--note``
says what else ran.

Both terms of the fitter's objective (MSE and the perceptual one) see the image's own
pixels only, never the padding to a multiple of 64 px.

Writes ``PREFIX.md`` (the tables, what was measured, machine, date, model) and
``PREFIX.json`` (per-image numbers and means), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from corrdiff import CorrDiffCodec, weights
from corrdiff.gamma import GammaFitter, perceptual_fitter
from corrdiff.metrics import LPIPS, MetricReference, psnr
from corrdiff.schedule import NoiseSchedule
from pipeline.evaluation_report import strict_json
from pipeline.image_folder import load_images


@dataclass(frozen=True)
class Setting:
    """One encoder configuration: a sampler step count and a codec with its gamma fitter."""

    key: str
    label: str
    steps: int
    codec: CorrDiffCodec

    @property
    def perceptual(self) -> bool:
        return self.codec.gamma_fitter.perceptual is not None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a shipped model's name or a weights file")
    parser.add_argument("--images", required=True, help="folder (or fsspec URL) of held-out images")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.md and PREFIX.json")
    parser.add_argument("--steps", default="4,8,16", help="step counts of ablation 1, comma-separated")
    parser.add_argument("--perceptual-weights", default="0.1,1.0", help="LPIPS weights of ablation 2, comma-separated")
    parser.add_argument("--t-max", default="", help="start times of ablation 3, comma-separated (default: none)")
    parser.add_argument("--max-images", type=int, help="measure only the first N images (to fit a time budget)")
    parser.add_argument("--note", default="", help="what else the machine was doing, for the report")
    return parser.parse_args(argv)


def step_settings(codec: CorrDiffCodec, step_counts: list[int]) -> list[Setting]:
    """Ablation 1: the codec as shipped (closed-form MSE gamma) at each step count."""
    return [Setting(f"steps-{s}", f"{s} steps, closed-form MSE gamma", s, codec) for s in step_counts]


def gamma_settings(codec: CorrDiffCodec, perceptual_weights: list[float], lpips: LPIPS) -> list[Setting]:
    """Ablation 2: the same model with a perceptually refined gamma, at the default step count."""
    settings = []
    for w in perceptual_weights:
        fitter = perceptual_fitter(lpips, GammaFitter.refine_steps, GammaFitter.learning_rate, weight=w)
        label = f"MSE + {w:g} LPIPS-alex, {fitter.refine_steps} Adam steps (lr {fitter.learning_rate:g})"
        refined = CorrDiffCodec(codec.model, device=codec.device, gamma_fitter=fitter)
        settings.append(Setting(f"lpips-{w:g}", label, codec.default_steps, refined))
    return settings


def t_max_settings(codec: CorrDiffCodec, model_path: Path, t_maxes: list[float]) -> list[Setting]:
    """Ablation 3: the same networks sampling from other start times, closed-form gamma."""
    settings = []
    for t_max in t_maxes:
        variant = weights.load_model(model_path)  # a copy of the networks (the entropy coders do not deepcopy)
        variant.config = replace(variant.config, diffusion=replace(variant.config.diffusion, t_max=t_max))
        variant.schedule = NoiseSchedule.from_config(variant.config.diffusion)
        settings.append(Setting(f"tmax-{t_max:g}", f"t_max {t_max:g}, closed-form MSE gamma", codec.default_steps,
                                CorrDiffCodec(variant, device=codec.device)))
    return settings


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def check_decode_matches(codec: CorrDiffCodec, image: np.ndarray) -> None:
    """Assert that decoding a record gives the encoder's reconstruction (also warms up the model)."""
    [encoded] = codec.encode_detailed([image], seed=0)
    [decoded] = codec.decode([encoded.record])
    assert np.array_equal(decoded, encoded.reconstruction), "decode differs from encode_detailed's reconstruction"


def quality(original: np.ndarray, reconstruction: np.ndarray, lpips: MetricReference) -> dict[str, float]:
    return {"psnr": psnr(original, reconstruction), "lpips": lpips(reconstruction)}


def measure(setting: Setting, image: np.ndarray, lpips: MetricReference) -> tuple[dict, bytes]:
    """Encode one image under ``setting``: its rate, quality, encode time and gammas, and the record.

    For the closed-form settings (ablation 1) the record is also decoded with gamma = 0.
    """
    started = time.perf_counter()
    [encoded] = setting.codec.encode_detailed([image], seed=0, steps=setting.steps)
    seconds = time.perf_counter() - started
    result = {"bpp": encoded.bpp, **quality(image, encoded.reconstruction, lpips), "encode_seconds": seconds,
              "mean_gamma": float(np.mean(encoded.gammas)), "gammas": list(encoded.gammas)}
    if not setting.perceptual:
        [plain] = setting.codec.decode([encoded.record], mode="diffusion", steps=setting.steps)
        result["diffusion"] = quality(image, plain, lpips)
    return result, encoded.record


def measure_image(name: str, image: np.ndarray, settings: list[Setting], lpips: LPIPS) -> dict:
    """Every setting on one image, plus D's output alone (the e2e decode, the same for all
    settings); the original's LPIPS features are computed once for all its scores."""
    reference = lpips.reference(image)
    row: dict = {"name": Path(name).name, "height": image.shape[0], "width": image.shape[1], "settings": {}}
    records = {}
    for setting in settings:
        result, records[setting.key] = measure(setting, image, reference)
        row["settings"][setting.key] = result
        print(f"{row['name']} {setting.key}: {_summary(result)}", flush=True)
    # Every record carries the same latent; the first setting's codec is the shipped model.
    [x_e] = settings[0].codec.decode([records[settings[0].key]], mode="e2e")
    row["e2e"] = quality(image, x_e, reference)
    return row


def mean(rows: list[dict]) -> dict:
    """Mean of every number (nested dicts too), over rows of the same shape; lists are left out."""
    out: dict = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = mean([row[key] for row in rows])
        elif isinstance(value, (int, float)):
            out[key] = float(np.mean([row[key] for row in rows]))
    return out


def run(args: argparse.Namespace) -> dict:
    """Both ablations on every image; the report that PREFIX.json holds."""
    torch.set_num_threads(1)
    model_path = weights.resolve(args.model)
    codec = CorrDiffCodec.from_pretrained(model_path, device="cpu")
    lpips = LPIPS("alex", device="cpu")
    images = load_images(args.images, lpips.min_side)
    if not images:
        raise SystemExit(f"no image under {args.images} is large enough to measure")
    available = len(images)
    images = images[:args.max_images] if args.max_images else images
    default = codec.default_steps
    step_counts = [int(s) for s in args.steps.split(",")]
    if default not in step_counts:
        raise SystemExit(f"--steps must include the model's default, {default}: ablation 2 reuses that run")
    model_t_max = codec.model.config.diffusion.t_max
    t_maxes = [t for t in _floats(args.t_max) if t != model_t_max]
    steps_run = step_settings(codec, step_counts)
    gamma_run = gamma_settings(codec, _floats(args.perceptual_weights), lpips)
    t_max_run = t_max_settings(codec, model_path, t_maxes)
    settings = [*steps_run, *gamma_run, *t_max_run]
    check_decode_matches(codec, images[0][1])
    per_image = [measure_image(name, image, settings, lpips) for name, image in images]
    return {
        "model": {"name": model_path.stem, "id": codec.model_id_hex},
        "images_url": args.images, "images_measured": len(images), "images_available": available,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "note": args.note,
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "default_steps": default,
        "t_max": model_t_max,
        "step_settings": [s.key for s in steps_run],
        "gamma_settings": [f"steps-{default}", *(s.key for s in gamma_run)],
        "t_max_settings": [key for _, key in sorted([(model_t_max, f"steps-{default}"),
                                                     *((s.codec.model.config.diffusion.t_max, s.key) for s in t_max_run)])],
        "labels": {s.key: s.label for s in settings},
        "images": per_image,
        "means": {"e2e": mean([im["e2e"] for im in per_image]),
                  **{s.key: mean([im["settings"][s.key] for im in per_image]) for s in settings}},
    }


def _summary(result: dict) -> str:
    return (f"{result['bpp']:.4f} bpp, {result['psnr']:.2f} dB, LPIPS {result['lpips']:.4f}, "
            f"{result['encode_seconds']:.1f} s")


def step_table(report: dict) -> str:
    means = report["means"]
    lines = ["| steps | bpp | PSNR (dB) | LPIPS | diffusion PSNR (dB) | diffusion LPIPS | correction: ΔPSNR | "
             "correction: ΔLPIPS | mean γ | encode s/image |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in report["step_settings"]:
        m = means[key]
        steps = key.removeprefix("steps-") + (" (default)" if key == f"steps-{report['default_steps']}" else "")
        lines.append(f"| {steps} | {m['bpp']:.4f} | {m['psnr']:.2f} | {m['lpips']:.4f} | {m['diffusion']['psnr']:.2f} | "
                     f"{m['diffusion']['lpips']:.4f} | {m['psnr'] - m['diffusion']['psnr']:+.2f} | "
                     f"{m['lpips'] - m['diffusion']['lpips']:+.4f} | {m['mean_gamma']:.3f} | {m['encode_seconds']:.1f} |")
    e2e = means["e2e"]
    lines.append(f"\nReference, D alone (e2e decode, any step count): {e2e['psnr']:.2f} dB, LPIPS {e2e['lpips']:.4f}.")
    return "\n".join(lines)


def gamma_table(report: dict) -> str:
    means = report["means"]
    base = means[f"steps-{report['default_steps']}"]
    lines = [f"| gamma fit ({report['default_steps']} steps) | bpp | PSNR (dB) | LPIPS | ΔLPIPS vs closed form | "
             "mean γ | encode s/image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key in report["gamma_settings"]:
        m = means[key]
        label = "closed-form MSE (default)" if key.startswith("steps-") else report["labels"][key]
        lines.append(f"| {label} | {m['bpp']:.4f} | {m['psnr']:.2f} | {m['lpips']:.4f} | "
                     f"{m['lpips'] - base['lpips']:+.4f} | {m['mean_gamma']:.3f} | {m['encode_seconds']:.1f} |")
    return "\n".join(lines)


def t_max_table(report: dict) -> str:
    means = report["means"]
    lines = [f"| t_max ({report['default_steps']} steps) | bpp | PSNR (dB) | LPIPS | diffusion PSNR (dB) | "
             "diffusion LPIPS | mean γ | encode s/image |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in report["t_max_settings"]:
        m = means[key]
        label = f"{report['t_max']:g} (the model's)" if key.startswith("steps-") else key.removeprefix("tmax-")
        lines.append(f"| {label} | {m['bpp']:.4f} | {m['psnr']:.2f} | {m['lpips']:.4f} | {m['diffusion']['psnr']:.2f} | "
                     f"{m['diffusion']['lpips']:.4f} | {m['mean_gamma']:.3f} | {m['encode_seconds']:.1f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    machine, model = report["machine"], report["model"]
    threads = machine["torch_threads"]
    hardware = f"{machine['cpu_count']} CPU cores, {threads} torch thread{'s' if threads > 1 else ''}" + (
        f", {machine['note']}" if machine["note"] else "")
    subset = ("" if report["images_measured"] == report["images_available"] else
              f" (the first {report['images_measured']} of {report['images_available']}, to fit the time budget)")
    sections = [("Step count", step_table(report), len(report["step_settings"]) > 1),
                ("Gamma fitting", gamma_table(report), len(report["gamma_settings"]) > 1),
                ("Start of sampling", t_max_table(report), len(report["t_max_settings"]) > 1)]
    return "\n".join([
        f"# Inference ablations: {model['name']} (model id `{model['id']}`)",
        "",
        f"{report['images_measured']} held-out photos from `{report['images_url']}`{subset}, at full size, "
        f"seed 0; {report['date']}; {hardware}; torch {machine['torch']}. Produced by "
        "`benchmarks/ablations.py`, whose docstring describes the method; per-image numbers and "
        "gammas in the JSON file beside this one.",
        "",
        "What was measured: mean bpp of the whole record, and mean PSNR and LPIPS-alex of the "
        "corrdiff reconstruction (exactly what `decode` returns), over the images; encode wall-clock "
        "seconds per image (timings on a shared machine are indicative). In the step-count table "
        "the same records are also decoded with gamma = 0 (plain DDIM at the same step count), and "
        "the correction columns are corrdiff minus that. In the gamma table the closed-form row is "
        "the default-step run of the first table; the refined fitters start from the closed form "
        "and keep the best gamma seen for MSE + w * LPIPS (both on the image's own pixels). In the "
        "start-of-sampling table the same networks sample from x_e noised to level t_max, with their "
        "steps spread over (0, t_max]; the model's own t_max is the default-step run.",
        "",
        *[line for title, table, ran in sections if ran for line in (f"## {title}", "", table, "")],
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    Path(f"{args.output}.md").write_text(text)
    Path(f"{args.output}.json").write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    return report


if __name__ == "__main__":
    main()
