"""Do per-tile gammas pay for their bits? One gamma per step for the image against one per
step per score tile (issue 21, item 3; the rule is docs/method.md, "One gamma per tile?").

    python benchmarks/tile_gammas.py --images DIR [--model NAME_OR_PATH] [--tilings 256/64 128/32]
                                     [--crop 384] [--threads N] [--output PREFIX]

For each photo (centre-cropped to at most ``--crop`` px a side, 0 = whole: seconds matter
on two cores) and each tiling (``tile/overlap`` px), at the same latent, seed and steps:

* **(a) one gamma per step**: the codec's own encode (``CorrDiffCodec.encode_detailed``),
  its record's bpp and its reconstruction: today's records.
* **(b) one gamma per step per score tile**: the corrected estimate becomes
  x0_theta + Gamma * (x_e - x0_theta), Gamma(p) the blend-weighted mix of the gammas of the
  tiles covering p (the weights that blend the tiles' estimates, so the correction is as
  smooth across a seam as the estimate); a step's K gammas are fitted jointly by least
  squares on the image's own pixels (a K x K system in float64; the whole-image closed
  form is its one-tile case) and float16-quantised like today's. Its rate is (a)'s plus
  16 bits per step for each tile beyond the first (the record already carries one gamma a
  step).

(b) runs this file's sampler, a copy of ``corrected_ddim_tiled`` whose gamma is a map.
Before the photos, a self-check asserts that it reproduces the codec's pixels exactly
when its map is the codec's whole-image gamma (a small crop of the first photo, the
smallest tiling); and for each photo and tiling, that the whole-image gamma of (b)'s
first estimate is (a)'s first gamma (the same latent, seed and tiles). Quality: PSNR and
LPIPS-alex of each reconstruction against the cropped original. The verdict applies the
rule of docs/method.md with the shipped models' rate-quality slope (:data:`RATE_POINTS`).
Prints one JSON line per photo and tiling and a summary; ``--output`` also writes
PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from corrdiff import CorrDiffCodec, weights
from corrdiff.codec import pixel_source
from corrdiff.gamma import quantize_gamma
from corrdiff.latent_codec import PixelSource, pad_amount
from corrdiff.metrics import LPIPS, psnr
from corrdiff.model import CorrDiffModel
from corrdiff.tiled_sampler import (
    STRIPE_ROWS, TiledDenoiser, closed_form_fit, initial_state_tiled, reconstruct_e2e_tiled, to_image,
)
from corrdiff.tiling import Span, Tiling

GAMMA_BITS = 16  # float16, as the record stores each gamma
# The shipped models on the ten held-out photos (docs/models.md, "Choosing a model";
# docs/eval/corrdiff-photo-0.15-r2.md, corrdiff-photo-0.3-r9.md): bpp, PSNR dB, LPIPS-alex.
# Their secant is what a bit buys through the codec's own rate-quality curve.
RATE_POINTS = {"corrdiff-photo-0.15-r2": (0.1501, 25.62, 0.4369), "corrdiff-photo-0.3-r9": (0.2918, 29.00, 0.1909)}
_LOW, _HIGH = RATE_POINTS["corrdiff-photo-0.15-r2"], RATE_POINTS["corrdiff-photo-0.3-r9"]
PSNR_PER_BPP = (_HIGH[1] - _LOW[1]) / (_HIGH[0] - _LOW[0])  # dB per bpp, about 23.9
LPIPS_PER_BPP = (_LOW[2] - _HIGH[2]) / (_HIGH[0] - _LOW[0])  # LPIPS-alex drop per bpp, about 1.74
PHOTO_SHARE = 2 / 3  # the net gain must be positive on at least this share of the photos, per metric

# step, x0_theta -> (a gamma map (H, W) over the padded image, the gammas transmitted for it)
MapRule = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of held-out photos")
    parser.add_argument("--model", help="bundled model name or weights file (default: the default model)")
    parser.add_argument("--tilings", nargs="+", default=["256/64", "128/32"])
    parser.add_argument("--crop", type=int, default=384, help="centre crop, px a side at most (0: whole photos)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", help="write PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)
    if args.crop < 0:
        parser.error(f"--crop must be 0 (whole photos) or a side in px, got {args.crop}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    codec = CorrDiffCodec.from_pretrained(args.model, device="cpu")
    lpips = LPIPS("alex")
    tilings = [Tiling(*(int(v) for v in spec.split("/"))) for spec in args.tilings]
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no .png or .jpg photos in {args.images}")
    images = {p.name: centre_crop(np.asarray(Image.open(p).convert("RGB")), args.crop) for p in paths}
    self_check(codec, next(iter(images.values())), min(tilings, key=lambda t: t.tile))
    rows = []
    for name, image in images.items():
        for tiling in tilings:
            rows.append(compare(codec, lpips, name, image, tiling))
            print(json.dumps(rows[-1]), flush=True)
    summary = [summarise([r for r in rows if r["tiling"] == f"{t.tile}/{t.overlap}"]) for t in tilings]
    verdict = "pay" if all(s["pays"] for s in summary) else "do not pay"
    print("\ntiling   tiles  bpp (a)  +side bpp  PSNR a/b dB      LPIPS a/b        gain dB (bar)     "
          "LPIPS drop (bar)   verdict")
    for s in summary:
        print(f"{s['tiling']:<8} {s['tiles']:<6.1f} {s['bpp_a']:<8.4f} {s['side_bpp']:<10.5f} "
              f"{s['psnr_a']:.3f}/{s['psnr_b']:.3f}  {s['lpips_a']:.4f}/{s['lpips_b']:.4f}  "
              f"{s['psnr_gain']:+.4f} ({s['psnr_bar']:.4f})  {s['lpips_drop']:+.5f} ({s['lpips_bar']:.5f})  "
              f"{'pays' if s['pays'] else 'does not pay'}")
    print(f"\nPer-tile gammas {verdict} (docs/method.md: at every tiling, mean gains above the bar on PSNR and "
          f"LPIPS-alex, net gain positive on at least {PHOTO_SHARE:.0%} of the photos on each)")
    results = {"model": args.model or weights.DEFAULT_MODEL, "model_id": codec.model_id_hex, "threads": args.threads,
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "crop": args.crop,
               "images": {name: list(image.shape[:2]) for name, image in images.items()},
               "psnr_per_bpp": PSNR_PER_BPP, "lpips_per_bpp": LPIPS_PER_BPP, "verdict": verdict,
               "summary": summary, "rows": rows}
    if args.output:
        Path(f"{args.output}.json").write_text(json.dumps(results, indent=2) + "\n")
        Path(f"{args.output}.md").write_text(markdown(results))
    return results


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The centre of the photo, at most ``side`` px on each axis (0: the whole photo)."""
    if side == 0:
        return image
    height, width = image.shape[:2]
    top, left = (height - min(side, height)) // 2, (width - min(side, width)) // 2
    return np.ascontiguousarray(image[top:top + min(side, height), left:left + min(side, width)])


def self_check(codec: CorrDiffCodec, image: np.ndarray, tiling: Tiling) -> None:
    """Assert that this file's sampler, given the codec's whole-image gamma as its map,
    reproduces the codec's reconstruction exactly: then (b) differs from (a) in its gammas
    alone. On a crop that holds two score tiles a side, to keep it cheap."""
    side = tiling.tile + 64
    crop = np.ascontiguousarray(image[:side, :side])
    codec.tiling = tiling
    [encoded] = codec.encode_detailed([crop])
    setup = Setup(codec.model, crop, encoded.latent, encoded.seed, tiling)
    fit = closed_form_fit(setup.pixels, setup.height, setup.width, setup.x_e)
    rule = lambda step, x0: _uniform(fit(step, x0), x0)  # noqa: E731
    out, gammas = setup.sample(rule, len(encoded.gammas))
    if tuple(float(g) for g in gammas[0]) != encoded.gammas:
        raise AssertionError("self-check: the whole-image gammas differ from the codec's")
    if not np.array_equal(to_image(out, setup.height, setup.width), encoded.reconstruction):
        raise AssertionError("self-check: this sampler's pixels differ from the codec's with the codec's gammas")
    print(f"self-check passed: {crop.shape[1]}x{crop.shape[0]} crop at {tiling.tile}/{tiling.overlap}, "
          f"{len(setup.denoiser.rows) * len(setup.denoiser.cols)} score tiles: the codec's pixels exactly", flush=True)


def compare(codec: CorrDiffCodec, lpips: LPIPS, name: str, image: np.ndarray, tiling: Tiling) -> dict:
    """(a) and (b) for one photo and tiling: rates, qualities, gains and the bars they must clear."""
    codec.tiling = tiling
    started = time.perf_counter()
    [encoded] = codec.encode_detailed([image])
    seconds_a = time.perf_counter() - started
    setup = Setup(codec.model, image, encoded.latent, encoded.seed, tiling)
    whole = closed_form_fit(setup.pixels, setup.height, setup.width, setup.x_e)
    per_tile = TileGammaFit(setup)

    def rule(step: int, x0: Tensor) -> tuple[Tensor, Tensor]:
        if step == 0 and float(whole(step, x0)) != encoded.gammas[0]:
            raise AssertionError(f"{name}: (b)'s first estimate is not (a)'s (another latent, seed or tiling)")
        return per_tile(x0)

    started = time.perf_counter()
    out, gammas = setup.sample(rule, len(encoded.gammas))
    seconds_b = time.perf_counter() - started
    reconstruction = to_image(out, setup.height, setup.width)
    tiles = gammas.shape[0]
    pixels = setup.height * setup.width
    side_bpp = GAMMA_BITS * len(encoded.gammas) * (tiles - 1) / pixels
    psnr_a, psnr_b = psnr(image, encoded.reconstruction), psnr(image, reconstruction)
    lpips_a, lpips_b = lpips(image, encoded.reconstruction), lpips(image, reconstruction)
    row = {"image": name, "height": setup.height, "width": setup.width, "tiling": f"{tiling.tile}/{tiling.overlap}",
           "tiles": tiles, "bpp_a": encoded.bpp, "side_bpp": side_bpp, "bpp_b": encoded.bpp + side_bpp,
           "side_share": side_bpp / encoded.bpp, "psnr_a": psnr_a, "psnr_b": psnr_b,
           "lpips_a": lpips_a, "lpips_b": lpips_b, "psnr_gain": psnr_b - psnr_a, "lpips_drop": lpips_a - lpips_b,
           "psnr_bar": PSNR_PER_BPP * side_bpp, "lpips_bar": LPIPS_PER_BPP * side_bpp,
           "gammas_a": list(encoded.gammas),
           "tile_gamma_spread": float((gammas.max(0).values - gammas.min(0).values).mean()),
           "encode_s_a": seconds_a, "sample_s_b": seconds_b}
    row["psnr_net"] = row["psnr_gain"] - row["psnr_bar"]
    row["lpips_net"] = row["lpips_drop"] - row["lpips_bar"]
    return row


class Setup:
    """What (a) and (b) share for one photo and tiling: the codec's latent, x_e, seeded x_T and tiles."""

    def __init__(self, model: CorrDiffModel, image: np.ndarray, latent: Tensor, seed: int, tiling: Tiling) -> None:
        self.model = model
        self.height, self.width = image.shape[:2]
        self.padded = (self.height + pad_amount(self.height), self.width + pad_amount(self.width))
        self.pixels: PixelSource = pixel_source(image, latent.device)
        self.x_e = reconstruct_e2e_tiled(model, latent, tiling.tile)
        self.x_start = initial_state_tiled(self.x_e, seed, model.schedule.alpha_bar(model.schedule.t_max))
        self.denoiser = TiledDenoiser(model, self.x_e, latent, tiling, spread=True)

    @torch.no_grad()
    def sample(self, rule: MapRule, steps: int) -> tuple[Tensor, Tensor]:
        """``corrected_ddim_tiled`` with a gamma per pixel: the same operations in the same
        order, ``g`` a map instead of a scalar (a constant map gives the codec's floats).
        Returns the final image in [-1, 1] and the gammas sent, (K, steps)."""
        schedule, x_e, x = self.model.schedule, self.x_e, self.x_start.clone()
        times = schedule.timesteps(steps)
        x0 = torch.empty_like(x)
        sent = []
        for i in range(steps):
            a, a_next = schedule.alpha_bar(times[i]), schedule.alpha_bar(times[i + 1])
            self.denoiser(x, times[i], x0)
            g, gammas = rule(i, x0)
            for top in range(0, x.shape[-2], STRIPE_ROWS):
                rows = slice(top, min(top + STRIPE_ROWS, x.shape[-2]))
                x0s, xs = x0[..., rows, :], x[..., rows, :]
                x0s += g[rows] * (x_e[..., rows, :] - x0s)
                eps = (xs - math.sqrt(a) * x0s) / math.sqrt(1.0 - a)
                xs.copy_(math.sqrt(a_next) * x0s + math.sqrt(1.0 - a_next) * eps)
            sent.append(gammas)
        return x, torch.stack(sent, dim=1)


class TileGammaFit:
    """One gamma per score tile, fitted jointly: argmin over g of
    sum_p |x - x0 - (sum_k w_k(p) g_k)(x_e - x0)|^2 on the image's own pixels.

    w_k = row weight x column weight of tile k, so the normal equations' matrix
    A[k, l] = sum_p w_k w_l |d|^2 (d = x_e - x0) is two matrix products of the per-axis
    weight products with the image of |d|^2. A tile whose direction is zero everywhere gets
    gamma 1 (any value is optimal; as the whole-image rule)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.x = setup.pixels(0, 0, setup.height, setup.width) * 2.0 - 1.0
        rows, cols = setup.denoiser.rows, setup.denoiser.cols
        self.rows = _weight_matrix(rows, setup.padded[0])  # (n_r, H) float64
        self.cols = _weight_matrix(cols, setup.padded[1])  # (n_c, W)

    def __call__(self, x0_theta: Tensor) -> tuple[Tensor, Tensor]:
        h, w = self.setup.height, self.setup.width
        estimate = x0_theta[..., :h, :w]
        direction = (self.setup.x_e[..., :h, :w] - estimate).double()
        residual = (self.x - estimate).double()
        energy = (direction * direction).sum(1)[0]  # (h, w)
        correlation = (residual * direction).sum(1)[0]
        rows, cols = self.rows[:, :h], self.cols[:, :w]
        n_r, n_c = rows.shape[0], cols.shape[0]
        b = (rows @ correlation @ cols.T).reshape(-1)
        row_pairs = (rows[:, None, :] * rows[None, :, :]).reshape(n_r * n_r, h)
        col_pairs = (cols[:, None, :] * cols[None, :, :]).reshape(n_c * n_c, w)
        a = (row_pairs @ energy @ col_pairs.T).reshape(n_r, n_r, n_c, n_c).permute(0, 2, 1, 3).reshape(n_r * n_c, -1)
        gammas = torch.ones(n_r * n_c, dtype=torch.float64)
        active = a.diagonal() > 0
        if active.any():
            gammas[active] = torch.linalg.solve(a[active][:, active], b[active])
        gammas = quantize_gamma(gammas)
        gamma_map = (self.rows.T @ gammas.double().reshape(n_r, n_c) @ self.cols).float()
        return gamma_map.to(x0_theta.device), gammas


def _weight_matrix(spans: list[Span], length: int) -> Tensor:
    """Each score tile's normalised blend weights along one axis, zero outside it: (tiles, length)."""
    matrix = torch.zeros((len(spans), length), dtype=torch.float64)
    for i, span in enumerate(spans):
        matrix[i, span.start:span.stop] = span.weights.double().cpu()
    return matrix


def _uniform(gamma: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The whole-image gamma as a constant map (bit-identical to the codec's scalar)."""
    return torch.full(tuple(x0.shape[-2:]), float(gamma), dtype=x0.dtype, device=x0.device), gamma.view(1)


def summarise(rows: list[dict]) -> dict:
    """Means over the photos of one tiling, and its verdict by the rule of docs/method.md."""
    keys = ("tiles", "bpp_a", "side_bpp", "bpp_b", "side_share", "psnr_a", "psnr_b", "lpips_a", "lpips_b",
            "psnr_gain", "lpips_drop", "psnr_bar", "lpips_bar", "psnr_net", "lpips_net", "tile_gamma_spread")
    summary = {"tiling": rows[0]["tiling"], "photos": len(rows),
               **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    summary["psnr_net_positive"] = sum(r["psnr_net"] > 0 for r in rows)
    summary["lpips_net_positive"] = sum(r["lpips_net"] > 0 for r in rows)
    needed = math.ceil(PHOTO_SHARE * len(rows))
    summary["pays"] = bool(summary["psnr_gain"] > summary["psnr_bar"] and summary["lpips_drop"] > summary["lpips_bar"]
                           and summary["psnr_net_positive"] >= needed and summary["lpips_net_positive"] >= needed)
    return summary


def markdown(results: dict) -> str:
    sizes = ", ".join(f"{name} ({w}x{h})" for name, (h, w) in results["images"].items())
    crop = f"centre crops of at most {results['crop']} px a side" if results["crop"] else "whole photos"
    lines = [f"# One gamma per tile against one per image, {results['model']} ({results['model_id']})", "",
             f"{results['date']}, CPU, {results['threads']} thread(s), `benchmarks/tile_gammas.py`; {crop}: {sizes}. "
             "(a) one closed-form gamma per step (the codec's records); (b) one per step per score tile, fitted "
             "jointly, blend-weighted per pixel; same latent, seed and steps. Side information: 16 bits per step "
             f"for each tile beyond the first. Bar: what the side information buys on the shipped models' "
             f"rate-quality curve, {results['psnr_per_bpp']:.1f} dB and {results['lpips_per_bpp']:.2f} LPIPS-alex "
             "per bpp (docs/method.md, \"One gamma per tile?\").", "",
             f"**Verdict: per-tile gammas {results['verdict']}.**", "",
             "| tiling | tiles | bpp (a) | side bpp | PSNR (a) | PSNR (b) | gain dB | bar dB | LPIPS (a) | LPIPS (b) "
             "| drop | bar | net > 0 (PSNR, LPIPS) | pays |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    lines += [f"| {s['tiling']} | {s['tiles']:.1f} | {s['bpp_a']:.4f} | {s['side_bpp']:.5f} | {s['psnr_a']:.3f} | "
              f"{s['psnr_b']:.3f} | {s['psnr_gain']:+.4f} | {s['psnr_bar']:.4f} | {s['lpips_a']:.4f} | "
              f"{s['lpips_b']:.4f} | {s['lpips_drop']:+.5f} | {s['lpips_bar']:.5f} | "
              f"{s['psnr_net_positive']}, {s['lpips_net_positive']} of {s['photos']} | {'yes' if s['pays'] else 'no'} |"
              for s in results["summary"]]
    lines += ["", "| photo | tiling | tiles | bpp (a) | bpp (b) | PSNR (a) | PSNR (b) | gain dB | bar | LPIPS (a) "
              "| LPIPS (b) | drop | bar | mean spread of a step's tile gammas |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['image']} | {r['tiling']} | {r['tiles']} | {r['bpp_a']:.4f} | {r['bpp_b']:.4f} | "
              f"{r['psnr_a']:.3f} | {r['psnr_b']:.3f} | {r['psnr_gain']:+.4f} | {r['psnr_bar']:.4f} | "
              f"{r['lpips_a']:.4f} | {r['lpips_b']:.4f} | {r['lpips_drop']:+.5f} | {r['lpips_bar']:.5f} | "
              f"{r['tile_gamma_spread']:.3f} |" for r in results["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
