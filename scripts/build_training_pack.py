#!/usr/bin/env python3
"""Build the training data pack: real photographs at several scales, small enough to travel.

Why: a GPU is lent to a session for minutes, and what it trains on must travel with the
call: at most 64 MiB in all, of which the repository takes about 25 MiB, so the pack gets
at most 28 MiB. Within that, the codec should see as many different real photographs as
possible, both at their native resolution (the fine detail of a camera) and downscaled
(the detail density of the sub-megapixel images archives hold, which also hides the
sources' own JPEG/WebP artefacts). So each photograph is stored as up to three views:

- ``s1``: native resolution; ``s2`` and ``s4``: the whole photo downscaled by 2 and 4
  (Lanczos, as corrdiff.train_runtime.RandomCrops resamples);
- a view larger than ``--max-view-mpx`` keeps its central window of that many pixels, at
  the photo's aspect ratio (pixel statistics of that scale intact, field of view cut);
- a view with a side under ``--min-side`` (256 px, the smallest training crop) is dropped:
  pipeline.image_folder.load_images would skip it anyway.

Views are lossy WebP (``--quality``, libwebp method 6): at the same quality, about half the
bytes of JPEG. Pixels are decoded with the archive's own policy (pipeline.images.decode_image:
EXIF rotation, ICC profile to sRGB, alpha on white), so the pack holds what training sees.

Sources: the 38 wallpapers of scripts/build_photo_dataset.py (its allow-list and functions)
and the photos of scripts/training_pack_sources.py (GCompris, Enlightenment, LXQt, Tux
Paint, digiKam, Palapeli), from Debian packages fetched with ``apt-get download``. Held-out
evaluation photos (scripts/heldout_photos.py) come from other packages, and a photo that
looks like one (a thumbnail signature, robust to resizing and recompression) is refused.

Output, in DIR (default data/pack, ignored by git):
    <package>__<stem>__s<k>.webp   the views (k = 1, 2, 4: downscale factor)
    MANIFEST.csv                   file, package, package_version, original_path, scale,
                                   crop_box, width, height, sha256, source_sha256, licence,
                                   copyright, licence_source, debian_licence
    PACK.json                      settings, selection fingerprint, counts, megapixels, bytes

A second run with an intact output (same settings and allow-lists, every file matching its
hash) downloads nothing. Given the same package versions and libwebp, the bytes are the
same on every run.

Usage::

    python scripts/build_training_pack.py --output data/pack [--debs DIR]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # pipeline.images: the archive's decoding policy

from build_photo_dataset import PACKAGES as WALLPAPER_PACKAGES  # noqa: E402
from build_photo_dataset import collect as collect_wallpapers  # noqa: E402
from build_photo_dataset import deb_field, require_tools  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from training_pack_sources import (  # noqa: E402
    COLLECTORS,
    Licence,
    PackageTree,
    SourceError,
    SourcePhoto,
    selection_description,
)

MANIFEST_NAME = "MANIFEST.csv"
SUMMARY_NAME = "PACK.json"
MANIFEST_FIELDS = (
    "file", "package", "package_version", "original_path", "scale", "crop_box", "width", "height",
    "sha256", "source_sha256", "licence", "copyright", "licence_source", "debian_licence",
)
MIB = 2**20
# Bump when the way views are made or encoded changes, so that old packs are rebuilt.
PACK_FORMAT = 1


@dataclass(frozen=True)
class PackSettings:
    """Everything that decides the pack's bytes, besides the sources and libwebp."""

    quality: int = 90
    scales: tuple[int, ...] = (1, 2, 4)
    max_view_mpx: float = 0.3
    min_side: int = 256
    budget_mib: float = 28.0
    method: int = 6
    pack_format: int = PACK_FORMAT

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1-100, got {self.quality}")
        if not self.scales or any(s < 1 for s in self.scales):
            raise ValueError(f"scales must be downscale factors >= 1, got {self.scales}")
        if self.max_view_mpx * 1e6 < self.min_side**2:
            raise ValueError(f"max_view_mpx {self.max_view_mpx} cannot hold a {self.min_side} px square")

    def as_json(self) -> dict:
        return {**asdict(self), "scales": list(self.scales)}


@dataclass(frozen=True)
class View:
    """One stored view: the photo downscaled by ``scale``, then cut to ``box`` if too large."""

    scale: int
    image: Image.Image
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) in the scaled photo


@dataclass(frozen=True)
class PackFile:
    """An encoded view and its manifest row."""

    name: str
    data: bytes
    row: dict[str, str]


# --- views -------------------------------------------------------------------------------


def downscale(image: Image.Image, factor: int) -> Image.Image:
    """The whole photo ``factor`` times smaller (Lanczos); factor 1 is the photo itself."""
    if factor == 1:
        return image
    size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def central_window(width: int, height: int, max_pixels: int) -> tuple[int, int, int, int] | None:
    """The centred box of at most ``max_pixels`` at the image's aspect ratio; None if it fits."""
    if width * height <= max_pixels:
        return None
    ratio = math.sqrt(max_pixels / (width * height))
    w, h = int(width * ratio), int(height * ratio)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def make_views(image: Image.Image, settings: PackSettings) -> list[View]:
    """The views of one photo (RGB), smallest scale factor first; too-small views dropped."""
    views = []
    for factor in sorted(settings.scales):
        scaled = downscale(image, factor)
        box = central_window(scaled.width, scaled.height, int(settings.max_view_mpx * 1e6))
        view = scaled.crop(box) if box else scaled
        if min(view.size) >= settings.min_side:
            views.append(View(factor, view, box))
    return views


def encode_webp(image: Image.Image, settings: PackSettings) -> bytes:
    """Lossy WebP without metadata (no EXIF, no ICC: the pixels are sRGB already)."""
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=settings.quality, method=settings.method)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_photo(photo: SourcePhoto) -> Image.Image:
    """The photo's pixels as training sees them (pipeline.images.decode_image), as RGB."""
    return Image.fromarray(decode_image(photo.data))


SIGNATURE_SIDE = 32
# Cosine similarity of two signatures above which they are taken for the same photo.
# Measured: a copy trimmed by 1 % at each edge, resized and recompressed scores 0.985; the
# two most alike different photos in the pack score 0.90.
SAME_PHOTO = 0.95
NO_HELDOUT = np.empty((0, SIGNATURE_SIDE**2))


def signature(image: Image.Image) -> np.ndarray:
    """A 32x32 greyscale thumbnail, mean removed, unit length: the same photo scores ~1
    against itself resized, trimmed by a few pixels or recompressed."""
    thumbnail = image.convert("L").resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    vector = np.asarray(thumbnail, dtype=np.float64).ravel()
    vector -= vector.mean()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def check_not_heldout(photo: SourcePhoto, image: Image.Image, heldout: np.ndarray) -> None:
    """Refuse a photo whose signature matches a held-out photo's (rows of ``heldout``)."""
    if len(heldout):
        similarity = float(np.max(heldout @ signature(image)))
        if similarity > SAME_PHOTO:
            raise ValueError(f"{photo.package} {photo.original_path} looks like a held-out evaluation "
                             f"photo (similarity {similarity:.3f}); it must not be trained on")


def manifest_row(photo: SourcePhoto, name: str, data: bytes, view: View) -> dict[str, str]:
    return {
        "file": name,
        "package": photo.package,
        "package_version": photo.version,
        "original_path": photo.original_path,
        "scale": f"1/{view.scale}",
        "crop_box": ",".join(map(str, view.box)) if view.box else "",
        "width": str(view.image.width),
        "height": str(view.image.height),
        "sha256": sha256_hex(data),
        "source_sha256": sha256_hex(photo.data),
        "licence": photo.licence.licence,
        "copyright": photo.licence.copyright,
        "licence_source": photo.licence.stated_in,
        "debian_licence": photo.debian_licence,
    }


def pack_photo(photo: SourcePhoto, settings: PackSettings, heldout: np.ndarray = NO_HELDOUT) -> list[PackFile]:
    """Every view of one photo as a file, with its manifest row.

    ``heldout``: signatures (:func:`signature`) of photos that must never be trained on.
    """
    image = decode_photo(photo)
    check_not_heldout(photo, image, heldout)
    files = []
    for view in make_views(image, settings):
        data = encode_webp(view.image, settings)
        name = f"{photo.package}__{photo.stem}__s{view.scale}.webp"
        files.append(PackFile(name, data, manifest_row(photo, name, data, view)))
    return files


# --- the pack on disk ----------------------------------------------------------------------


def selection_fingerprint() -> str:
    """SHA-256 of every allow-list and licence statement: a changed selection rebuilds the pack."""
    text = repr((WALLPAPER_PACKAGES, selection_description()))
    return sha256_hex(text.encode("utf-8"))


def read_manifest(output: Path) -> list[dict[str, str]]:
    with (output / MANIFEST_NAME).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_up_to_date(output: Path, settings: PackSettings, fingerprint: str) -> bool:
    """True when PACK.json has these settings and selection and every listed file its hash."""
    try:
        summary = json.loads((output / SUMMARY_NAME).read_text(encoding="utf-8"))
        rows = read_manifest(output)
    except (OSError, ValueError):
        return False
    if summary.get("settings") != settings.as_json() or summary.get("selection") != fingerprint or not rows:
        return False
    return all((output / r["file"]).is_file() and file_sha256(output / r["file"]) == r["sha256"] for r in rows)


def check_unique(files: list[PackFile]) -> None:
    names = Counter(f.name for f in files)
    duplicates = sorted(name for name, count in names.items() if count > 1)
    if duplicates:
        raise ValueError(f"two photos would be stored under the same name: {duplicates}")


def check_budget(files: list[PackFile], settings: PackSettings) -> None:
    total = sum(len(f.data) for f in files)
    if total > settings.budget_mib * MIB:
        raise ValueError(
            f"the pack would be {total / MIB:.2f} MiB, over its {settings.budget_mib} MiB budget: "
            "lower --max-view-mpx or --quality, or drop a scale"
        )


def atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_manifest(rows: list[dict[str, str]], output: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["file"]))
    atomic_write(output / MANIFEST_NAME, buffer.getvalue().encode("utf-8"))


def summarise(files: list[PackFile], settings: PackSettings, fingerprint: str) -> dict:
    """What PACK.json records: settings, selection, and per-package counts, Mpx and bytes."""
    packages: dict[str, dict] = {}
    photos: dict[str, set[str]] = {}
    for f in files:
        entry = packages.setdefault(f.row["package"], {"version": f.row["package_version"], "photos": 0,
                                                       "files": 0, "megapixels": 0.0, "bytes": 0})
        photos.setdefault(f.row["package"], set()).add(f.row["original_path"])
        entry["files"] += 1
        entry["megapixels"] += int(f.row["width"]) * int(f.row["height"]) / 1e6
        entry["bytes"] += len(f.data)
    for name, entry in packages.items():
        entry["photos"] = len(photos[name])
        entry["megapixels"] = round(entry["megapixels"], 2)
    return {
        "settings": settings.as_json(),
        "selection": fingerprint,
        "photos": sum(e["photos"] for e in packages.values()),
        "files": len(files),
        "megapixels": round(sum(e["megapixels"] for e in packages.values()), 2),
        "bytes": sum(e["bytes"] for e in packages.values()),
        "packages": dict(sorted(packages.items())),
    }


def remove_stale(output: Path, keep: set[str]) -> None:
    """Delete views an earlier build listed in its manifest that this build does not make."""
    if not (output / MANIFEST_NAME).exists():
        return
    for row in read_manifest(output):
        stale = output / row["file"]
        if row["file"] not in keep and stale.parent == output and stale.is_file():
            stale.unlink()


def write_pack(files: list[PackFile], output: Path, settings: PackSettings, fingerprint: str) -> dict:
    """Write the views (only those that changed), then MANIFEST.csv and PACK.json last."""
    output.mkdir(parents=True, exist_ok=True)
    remove_stale(output, {f.name for f in files})
    for f in files:
        target = output / f.name
        if not (target.is_file() and file_sha256(target) == f.row["sha256"]):
            atomic_write(target, f.data)
    write_manifest([f.row for f in files], output)
    summary = summarise(files, settings, fingerprint)
    atomic_write(output / SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary


def build_pack(photos: list[SourcePhoto], output: Path, settings: PackSettings,
               fingerprint: str, heldout: np.ndarray = NO_HELDOUT) -> dict:
    """Encode ``photos`` into ``output`` within the budget; returns PACK.json's content.

    ``heldout``: signatures of the held-out photos, one per row; a photo among ``photos``
    that matches one is an error.
    """
    files: list[PackFile] = []
    for photo in sorted(photos, key=lambda p: (p.package, p.stem)):
        files += pack_photo(photo, settings, heldout)
    check_unique(files)
    check_budget(files, settings)
    return write_pack(files, output, settings, fingerprint)


# --- sources: Debian packages --------------------------------------------------------------


def fetch_debs(names: list[str], directory: Path) -> dict[str, Path]:
    """Package name -> .deb in ``directory``, downloading (``apt-get download``) the missing ones."""
    directory.mkdir(parents=True, exist_ok=True)
    found = {deb_field(deb, "Package"): deb for deb in sorted(directory.glob("*.deb"))}
    for name in names:
        if name in found:
            continue
        print(f"downloading {name}")
        result = subprocess.run(["apt-get", "download", name], cwd=directory, capture_output=True, text=True,
                                check=False)
        debs = sorted(directory.glob(f"{name}_*.deb"))
        if result.returncode != 0 or not debs:
            raise SystemExit(
                f"error: could not download the Debian package {name}: {result.stderr.strip()}\n"
                "If apt cannot locate it, run `apt-get update` (as root) and try again."
            )
        found[name] = debs[-1]
    return {name: found[name] for name in names}


def unpack(deb: Path, work: Path) -> PackageTree:
    name = deb_field(deb, "Package")
    root = work / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return PackageTree(name, deb_field(deb, "Version"), root)


def wallpaper_photos(debs: dict[str, Path], work: Path) -> list[SourcePhoto]:
    """The 38 photos of scripts/build_photo_dataset.py, through its own ``collect``."""
    copies = work / "wallpapers"
    copies.mkdir()
    photos = []
    for package in WALLPAPER_PACKAGES:
        for row in collect_wallpapers(package, debs[package.name], work, copies):
            copyright_file = f"/usr/share/doc/{row['package']}/copyright"
            photos.append(SourcePhoto(
                package=row["package"],
                version=row["package_version"],
                original_path=row["original_path"],
                stem=Path(row["file"].split("__", 1)[1]).stem,
                data=(copies / row["file"]).read_bytes(),
                licence=Licence(row["licence"], row["copyright"], copyright_file),
                debian_licence=row["licence"],
            ))
        shutil.rmtree(work / package.name)
    return photos


def source_photos(debs_dir: Path, work: Path) -> list[SourcePhoto]:
    """Every allow-listed photo of every package, with its licence."""
    names = [p.name for p in WALLPAPER_PACKAGES] + list(COLLECTORS)
    debs = fetch_debs(names, debs_dir)
    photos = wallpaper_photos(debs, work)
    for name, collect in COLLECTORS.items():
        print(f"reading {debs[name].name}")
        tree = unpack(debs[name], work)
        photos += collect(tree)
        shutil.rmtree(tree.root)
    return photos


def heldout_signatures() -> np.ndarray:
    """Signatures of the held-out photos that need no download (scripts/heldout_photos.py).

    The Debian held-out photos (libjxl-testdata) are in no package this script reads.
    """
    from heldout_photos import write_heldout_photos

    with tempfile.TemporaryDirectory(prefix="heldout-") as scratch:
        paths = write_heldout_photos(Path(scratch))
        return np.stack([signature(Image.fromarray(decode_image(path.read_bytes()))) for path in paths])


def print_summary(summary: dict, output: Path) -> None:
    print(f"{summary['photos']} photos, {summary['files']} files, {summary['megapixels']:.1f} Mpx, "
          f"{summary['bytes'] / MIB:.2f} MiB in {output}")
    for name, entry in summary["packages"].items():
        print(f"  {name} {entry['version']}: {entry['photos']} photos, {entry['files']} files, "
              f"{entry['megapixels']:.1f} Mpx, {entry['bytes'] / MIB:.2f} MiB")


def build(output: Path, settings: PackSettings, debs_dir: Path | None = None) -> dict:
    """Build the pack into ``output`` unless it is already up to date."""
    fingerprint = selection_fingerprint()
    if is_up_to_date(output, settings, fingerprint):
        print(f"{output / MANIFEST_NAME} is up to date; nothing to do")
        return json.loads((output / SUMMARY_NAME).read_text(encoding="utf-8"))
    require_tools()
    with tempfile.TemporaryDirectory(prefix="training-pack-") as scratch:
        work = Path(scratch)
        photos = source_photos(debs_dir or work / "debs", work)
        return build_pack(photos, output, settings, fingerprint, heldout=heldout_signatures())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = PackSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "data" / "pack",
                        help="directory for the views, MANIFEST.csv and PACK.json (default: data/pack)")
    parser.add_argument("--debs", type=Path, default=None,
                        help="keep downloaded .deb files here and reuse them (default: a temporary folder)")
    parser.add_argument("--quality", type=int, default=defaults.quality, help="WebP quality (default: %(default)s)")
    parser.add_argument("--scales", type=int, nargs="+", default=list(defaults.scales),
                        help="downscale factors of the views (default: %(default)s)")
    parser.add_argument("--max-view-mpx", type=float, default=defaults.max_view_mpx,
                        help="larger views keep their central window of this many megapixels (default: %(default)s)")
    parser.add_argument("--min-side", type=int, default=defaults.min_side,
                        help="drop views with a shorter side (default: %(default)s, the smallest training crop)")
    parser.add_argument("--budget-mib", type=float, default=defaults.budget_mib,
                        help="fail if the pack would be larger (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        settings = PackSettings(quality=args.quality, scales=tuple(args.scales), max_view_mpx=args.max_view_mpx,
                                min_side=args.min_side, budget_mib=args.budget_mib)
        summary = build(args.output, settings, args.debs)
    except (ValueError, SourceError) as error:  # BundleFormatError is a ValueError
        raise SystemExit(f"error: {error}") from None
    print_summary(summary, args.output)
    print(f"took {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
