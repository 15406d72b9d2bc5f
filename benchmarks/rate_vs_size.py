"""Does a model's rate depend on how large the coded image is? It should not.

    python benchmarks/rate_vs_size.py --model NAME_OR_PATH --images DIR [--output PREFIX]
        [--tiles 128,256,384]

The latent codec is convolutional, so the same pixels should cost about the same bits
whether they are coded as one image or cut into tiles; only the tiles' borders (zero
padding in every convolution) may cost a little extra. A model whose rate per pixel
grows with the image size has learned its entropy model on too small crops: with 128 px
training crops the hyper-latent z is 2x2, every z position is a corner, and h_s never sees
the interior positions that make up most of any real image (docs/models.md, "Crop size
and the hyperprior"). This script measures that, so every trained model can be checked.

For each image and each tile size S, the image is cut into the S x S tiles of a grid that
fit inside it (the rest is left out), each tile is coded on its own, and bpp is the coded
latent's bytes (z and y strings, no record header) over the tiles' pixels; PSNR is D's
reconstruction (the e2e decode) of the same tiles. "whole" codes the image in one piece,
replicate-padded to a multiple of 64 as the codec does, over the image's own pixels.
Means are over images. Real coded bytes, not likelihood estimates.

Prints a table; with ``--output`` also writes PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from corrdiff import CorrDiffCodec
from corrdiff.codec import image_to_tensor, tensor_to_image
from corrdiff.latent_codec import pad_to_stride
from corrdiff.metrics import psnr
from pipeline.image_folder import load_images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a shipped model's name or a weights file")
    parser.add_argument("--images", required=True, help="folder (or fsspec URL) of photos")
    parser.add_argument("--tiles", default="128,256,384", help="tile sizes, multiples of 64, comma-separated")
    parser.add_argument("--output", help="output prefix: writes PREFIX.md and PREFIX.json")
    return parser.parse_args(argv)


@torch.no_grad()
def code(codec: CorrDiffCodec, image: np.ndarray) -> tuple[int, np.ndarray]:
    """Coded latent bytes of one image and D's reconstruction of it (uint8, the image's size)."""
    height, width = image.shape[:2]
    x = pad_to_stride(image_to_tensor(image))[None].to(codec.device)
    (streams,), y_hat = codec.model.latent.compress(x)
    return len(streams.z) + len(streams.y), tensor_to_image(codec.model.reconstruct_e2e(y_hat))[:height, :width]


def measure(codec: CorrDiffCodec, image: np.ndarray, tile: int | None) -> dict[str, float] | None:
    """bpp and PSNR of the image coded whole (``tile=None``) or as a grid of tiles; None if no tile fits."""
    if tile is None:
        pieces = [image]
    else:
        rows, cols = image.shape[0] // tile, image.shape[1] // tile
        pieces = [image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    if not pieces:
        return None
    total_bytes, pixels = 0, 0
    originals, reconstructions = [], []
    for piece in pieces:
        n_bytes, reconstruction = code(codec, piece)
        total_bytes += n_bytes
        pixels += piece.shape[0] * piece.shape[1]
        originals.append(piece.reshape(-1, 1, 3))
        reconstructions.append(reconstruction.reshape(-1, 1, 3))
    return {"bpp": 8 * total_bytes / pixels, "psnr": psnr(np.concatenate(originals), np.concatenate(reconstructions)),
            "tiles": len(pieces)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    tiles = [int(t) for t in args.tiles.split(",")]
    if any(t % 64 for t in tiles):
        raise SystemExit(f"tile sizes must be multiples of 64 (the codec's padding stride), got {tiles}")
    codec = CorrDiffCodec.from_pretrained(args.model, device="cpu")
    sizes: list[int | None] = [*tiles, None]
    labels = [f"{t} px tiles" if t else "whole image" for t in sizes]
    images = load_images(args.images, min_side=min(tiles))
    if not images:
        raise SystemExit(f"no image under {args.images} is as large as a {min(tiles)} px tile")
    per_image = []
    for url, image in images:
        row = {"name": Path(url).name, "height": image.shape[0], "width": image.shape[1]}
        row["sizes"] = {label: measure(codec, image, size) for label, size in zip(labels, sizes)}
        per_image.append(row)
        print(row["name"], {k: v and round(v["bpp"], 3) for k, v in row["sizes"].items()}, flush=True)
    means = {}
    for label in labels:
        values = [r["sizes"][label] for r in per_image if r["sizes"][label] is not None]
        means[label] = {"images": len(values), "bpp": float(np.mean([v["bpp"] for v in values])),
                        "psnr": float(np.mean([v["psnr"] for v in values]))}
    lines = [
        f"# Rate against coded size: {args.model}",
        "",
        f"Model id `{codec.model_id_hex}`; images: `{args.images}` ({len(per_image)}); "
        f"{datetime.now(timezone.utc):%Y-%m-%d}. Latent bytes only (z + y), D's reconstruction; "
        "tiles that do not fit inside an image are left out (see benchmarks/rate_vs_size.py).",
        "",
        "| coded as | images | bpp | PSNR (dB) |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {m['images']} | {m['bpp']:.3f} | {m['psnr']:.2f} |" for label, m in means.items()),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.output}.md").write_text(report)
        Path(f"{args.output}.json").write_text(json.dumps(
            {"model": args.model, "model_id": codec.model_id_hex, "images": args.images,
             "means": means, "per_image": per_image}, indent=2) + "\n")


if __name__ == "__main__":
    main()
