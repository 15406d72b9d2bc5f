"""Does perceptual mode's gain survive a metric it did not optimise?

    python benchmarks/second_metric.py --model NAME_OR_PATH --images DIR --output PREFIX
        [--refine-steps 10] [--learning-rate 0.1]

Perceptual mode fits each gamma for MSE + LPIPS-alex, and docs/models.md reports it on
LPIPS-alex: the fit's objective is also the measure. This script scores the same three
reconstructions of every image with LPIPS-alex and with LPIPS-vgg, whose backbone and
learned weights the fit never saw: the model with closed-form gammas, the model in
perceptual mode (the same latent bytes), and JPEG at the quality whose rate is closest to
the model's record (``corrdiff.baselines.match_bpp``, the evaluation job's rule). If the
gain were the fit gaming AlexNet's features, LPIPS-vgg would not move with it.

Images at full size, seed 0, one torch thread. Writes ``PREFIX.md`` and ``PREFIX.json``
(per-image numbers and means) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corrdiff import CorrDiffCodec, weights  # noqa: E402
from corrdiff.baselines import match_bpp  # noqa: E402
from corrdiff.gamma import lpips_fitter  # noqa: E402
from corrdiff.metrics import LPIPS, psnr  # noqa: E402
from jobs.evaluate import strict_json  # noqa: E402
from pipeline.image_folder import load_images  # noqa: E402

METHODS = ("closed-form", "perceptual", "jpeg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a shipped model's name or a weights file")
    parser.add_argument("--images", required=True, help="folder (or fsspec URL) of held-out images")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.md and PREFIX.json")
    parser.add_argument("--refine-steps", type=int, default=10, help="perceptual mode's Adam steps per sampler step")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="perceptual mode's Adam learning rate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model_path = weights.resolve(args.model)
    closed = CorrDiffCodec.from_pretrained(model_path, device="cpu")
    alex, vgg = LPIPS("alex"), LPIPS("vgg")
    perceptual = CorrDiffCodec(closed.model, device="cpu",
                               gamma_fitter=lpips_fitter(alex, args.refine_steps, args.learning_rate))
    rows = []
    for url, image in load_images(args.images, alex.min_side):
        [plain] = closed.encode_detailed([image], seed=0)
        [refined] = perceptual.encode_detailed([image], seed=0)
        jpeg = match_bpp(image, "jpeg", plain.bpp)
        reconstructions = {"closed-form": (plain.bpp, plain.reconstruction),
                           "perceptual": (refined.bpp, refined.reconstruction),
                           "jpeg": (jpeg.bpp, jpeg.reconstruction)}
        row = {"name": Path(url).name, "methods": {
            method: {"bpp": bpp, "psnr": psnr(image, out), "lpips_alex": alex(image, out), "lpips_vgg": vgg(image, out)}
            for method, (bpp, out) in reconstructions.items()}}
        rows.append(row)
        print(row["name"], json.dumps(row["methods"]), flush=True)

    means = {m: {k: float(np.mean([r["methods"][m][k] for r in rows])) for k in ("bpp", "psnr", "lpips_alex", "lpips_vgg")}
             for m in METHODS}
    wins = {m: {k: sum(r["methods"][m][k] < r["methods"]["jpeg"][k] for r in rows) for k in ("lpips_alex", "lpips_vgg")}
            for m in METHODS[:2]}
    report = {"model": {"name": model_path.stem, "id": closed.model_id_hex}, "images_url": args.images,
              "refine_steps": args.refine_steps, "learning_rate": args.learning_rate,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "images": rows, "means": means, "photos_beating_jpeg": wins}
    table = markdown(report)
    Path(f"{args.output}.json").write_text(json.dumps(strict_json(report), indent=1) + "\n")
    Path(f"{args.output}.md").write_text(table)
    print(table)


def markdown(report: dict) -> str:
    count = len(report["images"])
    lines = [
        f"# LPIPS-alex and LPIPS-vgg: {report['model']['name']} (model id `{report['model']['id']}`)", "",
        f"{count} images from `{report['images_url']}`, {report['date']}; torch {report['torch']}. "
        f"Produced by `benchmarks/second_metric.py`, whose docstring says why. Perceptual mode: "
        f"{report['refine_steps']} Adam steps (lr {report['learning_rate']:g}) on MSE + LPIPS-alex per sampler step. "
        "Means over images; JPEG at the quality closest to the closed-form record's rate; "
        f"\"beats JPEG\" counts the photos (of {count}) where the method's LPIPS is lower than JPEG's.", "",
        "| method | bpp | PSNR (dB) | LPIPS-alex | LPIPS-vgg | beats JPEG: alex | beats JPEG: vgg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        m = report["means"][method]
        wins = report["photos_beating_jpeg"].get(method)
        counts = f"{wins['lpips_alex']} | {wins['lpips_vgg']}" if wins else "— | —"
        lines.append(f"| {method} | {m['bpp']:.4f} | {m['psnr']:.2f} | {m['lpips_alex']:.4f} | {m['lpips_vgg']:.4f} | {counts} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
