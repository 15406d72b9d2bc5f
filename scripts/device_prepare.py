#!/usr/bin/env python3
"""Prepare here what a GPU call carries, and check that it can travel (docs/training.md).

    python scripts/device_prepare.py [--wheels .whl] [--carry data/pack .whl] [--no-download]

1. Downloads into ``.whl/`` (ignored by git) the wheels the device image lacks, for its
   Python 3.12 (``pip download --no-deps --only-binary=:all: --python-version 3.12
   --implementation cp --platform manylinux_2_34_x86_64`` and the older manylinux tags
   that glibc 2.34 runs): compressai 1.2.8 (its rANS extension is built for cp312),
   pytorch-msssim 1.0.0 (compressai imports it at import time, although nothing here calls
   it), lpips 0.1.4 (pure Python), pillow-heif 1.8.1 and pillow-jxl-plugin 1.3.8
   (pipeline.images registers them at import, and training reads its photos through it),
   and pydantic 2.14.4 with pydantic-core 2.50.5, annotated-types, typing-inspection and
   typing-extensions (corrdiff's config layer validates every config and model config).
2. Writes ``.whl/lpips-alexnet-features-fp16.safetensors``: the convolutional layers of the
   AlexNet backbone that LPIPS-alex needs, from torch's cache here (scripts/setup.sh puts
   them there), in float16 (4.9 MB instead of 233 MB for the whole torchvision file;
   LPIPS values move by about 1e-5), and ``.whl/lpips-check.json``: one LPIPS value
   computed with exactly those weights, which the device recomputes after installing them.
3. Adds up what the call would send: tracked and untracked-not-ignored files, ``shared/``
   and the carried paths, against the device tool's 64 MiB; exits 1 if it is over, naming
   the largest parts. Then prints the ``run`` call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.device_train import LPIPS_CHECK, LPIPS_FEATURES, lpips_check_value, write_alexnet_backbone  # noqa: E402

WHEELS = ("compressai==1.2.8", "pytorch-msssim==1.0.0", "lpips==0.1.4", "pillow-heif==1.8.1",
          "pillow-jxl-plugin==1.3.8",
          # corrdiff's config layer (corrdiff.typed_config): pydantic and what it needs, as pinned here
          "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "typing-extensions==4.16.0")
# pip matches --platform exactly: the device's glibc 2.34 runs wheels built for older ones too
# (pillow-heif ships manylinux_2_28, pillow-jxl-plugin manylinux_2_17).
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64")
TRAVEL_LIMIT = 64 * 2**20
DEFAULT_CARRY = ("data/pack", ".whl")
RUN_COMMAND = "bash scripts/device_train.sh configs/train/gpu-photo-0.3.yaml 360"
RUN_TIMEOUT_S = 540


def download_wheels(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *(option for platform in PLATFORMS for option in ("--platform", platform)),
                    "-d", str(folder), *WHEELS], check=True)
    wheels = sorted(folder.glob("*.whl"))
    names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"{folder} holds two versions of {', '.join(sorted(duplicates))}: keep one "
                         "(pip refuses the whole install otherwise)")
    return wheels


def write_lpips_features(folder: Path) -> dict:
    """The AlexNet features in float16, and the LPIPS value the device must reproduce."""
    import torch
    from safetensors.torch import save_file

    from corrdiff.metrics import lpips_backbone_path

    source = lpips_backbone_path("alex")
    if not source.is_file():
        raise SystemExit(f"no AlexNet backbone at {source}: run scripts/install_lpips_weights.py first")
    state = torch.load(source, map_location="cpu", weights_only=True)
    features = {k: v.to(torch.float16).contiguous() for k, v in state.items() if k.startswith("features.")}
    target = folder / LPIPS_FEATURES
    save_file(features, str(target))
    # The check value is computed with the weights as the device will have them: rebuilt
    # from the float16 file into a scratch torch home, exactly as device_train.py does.
    import os

    previous = os.environ.get("TORCH_HOME")
    with tempfile.TemporaryDirectory(prefix="corrdiff-torch-home-") as home:
        os.environ["TORCH_HOME"] = home
        try:
            write_alexnet_backbone(target, lpips_backbone_path("alex"))
            value = lpips_check_value("cpu")
        finally:
            if previous is None:
                os.environ.pop("TORCH_HOME")
            else:
                os.environ["TORCH_HOME"] = previous
    check = {"value": value, "metric": "LPIPS-alex", "backbone": target.name,
             "pair": "examples/photos/life.jpg vs its bilinear 1/4 downscale, upscaled"}
    (folder / LPIPS_CHECK).write_text(json.dumps(check, indent=1) + "\n")
    return check


def travelling_bytes(carry: list[str]) -> tuple[int, list[tuple[int, str]]]:
    """Bytes the device tool would send: git's tracked + untracked-not-ignored files,
    shared/ and the carried paths (each counted once), and the largest of them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    files = {ROOT / name for name in listed if name and (ROOT / name).is_file()}
    for extra in [*carry, "shared"]:
        path = ROOT / extra
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file())
    sizes = sorted(((p.stat().st_size, str(p.relative_to(ROOT))) for p in files), reverse=True)
    return sum(size for size, _ in sizes), sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", default=".whl", help="folder for the wheels and the LPIPS backbone")
    parser.add_argument("--carry", nargs="*", default=list(DEFAULT_CARRY), help="paths the call will carry")
    parser.add_argument("--no-download", action="store_true", help="only check what would travel")
    args = parser.parse_args(argv)
    folder = ROOT / args.wheels
    if not args.no_download:
        for wheel in download_wheels(folder):
            print(f"{wheel.relative_to(ROOT)}  {wheel.stat().st_size / 2**20:.2f} MiB")
        check = write_lpips_features(folder)
        print(f"{args.wheels}/{LPIPS_FEATURES}  {(folder / LPIPS_FEATURES).stat().st_size / 2**20:.2f} MiB; "
              f"LPIPS check value {check['value']:.6f}")
    missing = [c for c in args.carry if not (ROOT / c).exists()]
    if missing:
        print(f"not here yet: {', '.join(missing)} (data/pack: scripts/build_training_pack.py)")
    total, sizes = travelling_bytes(args.carry)
    print(f"the call would send {total / 2**20:.1f} MiB of the device tool's {TRAVEL_LIMIT / 2**20:.0f} MiB")
    if total > TRAVEL_LIMIT:
        print("OVER THE LIMIT; largest parts:")
        for size, name in sizes[:12]:
            print(f"  {size / 2**20:7.2f} MiB  {name}")
        return 1
    print("device tool call (docs/training.md):")
    print(json.dumps({"command": RUN_COMMAND, "carry": args.carry, "timeout_s": RUN_TIMEOUT_S}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
