#!/usr/bin/env python3
"""Build the training set of real photographs from Debian wallpaper packages.

Why: the codec must learn from real camera photographs, and this project's machines reach
no image hosting, only the package registries. A few Debian wallpaper packages ship
high-resolution photographs under free licences. They also ship graphics, renderings and
abstract art, which would teach the codec the wrong statistics, so only an explicit
allow-list of files, each checked by eye, is copied.

For every photo, the licence and copyright holder are read from the package's own
``usr/share/doc/<package>/copyright`` (machine-readable DEP-5 format) at build time, so
the manifest states what the package actually ships. docs/training-data.md lists the set
and explains what was left out.

Output, in DIR:
    <package>__<filename>   the photographs, byte-for-byte as the package ships them
    MANIFEST.csv            file, package, package_version, original_path, width, height,
                            sha256, licence, copyright

Running it again is cheap: when MANIFEST.csv matches the allow-list and every file's
hash, nothing is downloaded.

Usage::

    python scripts/build_photo_dataset.py --output DIR
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

MANIFEST_NAME = "MANIFEST.csv"
MANIFEST_FIELDS = (
    "file",
    "package",
    "package_version",
    "original_path",
    "width",
    "height",
    "sha256",
    "licence",
    "copyright",
)


@dataclass(frozen=True)
class Package:
    """A Debian package and the photographs taken from it.

    `photos` are paths relative to `install_root`. debian/copyright names files by their
    path in the upstream source tree, which is `source_root` + the same relative path.
    """

    name: str
    install_root: str
    source_root: str
    photos: tuple[str, ...]
    # Some packages ship every wallpaper under the same file name (e.g. 2560x1600.jpg) in
    # a folder named after the wallpaper; those are stored under the folder's name.
    name_by_folder: bool = False

    def stored_name(self, photo: str) -> str:
        """File name in the output directory: `<package>__<filename>`."""
        path = PurePosixPath(photo)
        filename = path.parts[0] + path.suffix if self.name_by_folder else path.name
        return f"{self.name}__{filename}"


# Each file below was viewed and is a real photograph. Left out (graphics, renderings,
# abstract or composited art): mate-backgrounds abstract/ and desktop/; lomiri 16.04
# umang; lomiri 20.04 Fossa, Infinite-Sea, Painting-Colors; and 19 of the 30 Plasma
# wallpapers. docs/training-data.md gives the reasons.
PACKAGES = (
    Package(
        name="mate-backgrounds",
        install_root="usr/share/backgrounds/mate/",
        source_root="",
        photos=tuple(
            f"nature/{name}.jpg"
            for name in (
                "Aqua",
                "Blinds",
                "Dune",
                "FreshFlower",
                "Garden",
                "GreenMeadow",
                "LadyBird",
                "RainDrops",
                "Storm",
                "TwoWings",
                "Wood",
                "YellowFlower",
            )
        ),
    ),
    Package(
        name="lomiri-wallpapers-16.04",
        install_root="usr/share/backgrounds/",
        source_root="16.04/",
        photos=(
            "Bridge_by_Sander_Klootwijk.jpg",
            "Dragonfly_by_Bolly.jpg",
            "Picture_0B_by_freespace.jpg",
            "Picture_1A_by_freespace.jpg",
            "Wine_by_Jakkub_Mede.jpg",
            "aitzgorri_by_Aitzol_Berasategi.jpg",
            "analogpattern_by_Peter_Nerlich.jpg",
            "free_by_Peter_Nerlich.jpg",
            "friends_by_Aitzol_Berasategi.jpg",
            "greentock_by_Peter_Nerlich.jpg",
            "life_by_Aitzol_Berasategi.jpg",
            "picosdeeuropa_by_Aitzol_Berasategi.jpg",
            "seeding_by_Clements_Engelhardt.jpg",
            "sunset_by_Aitzol_Berasategi.jpg",
        ),
    ),
    Package(
        name="lomiri-wallpapers-20.04",
        install_root="usr/share/backgrounds/",
        source_root="20.04/",
        photos=("Kleiber_by_Lukas_Baubkus.jpg",),
    ),
    Package(
        name="plasma-workspace-wallpapers",
        install_root="usr/share/wallpapers/",
        source_root="",
        photos=tuple(
            f"{name}/contents/images/2560x1600.jpg"
            for name in (
                "BytheWater",
                "ColdRipple",
                "ColorfulCups",
                "DarkestHour",
                "EveningGlow",
                "FallenLeaf",
                "Grey",
                "Kite",
                "OneStandsOut",
                "Path",
                "summer_1am",
            )
        ),
        name_by_folder=True,
    ),
)


@dataclass(frozen=True)
class CopyrightStanza:
    """One `Files:` paragraph of a DEP-5 debian/copyright file."""

    patterns: tuple[str, ...]
    copyright: str
    licence: str


def parse_copyright(text: str) -> list[CopyrightStanza]:
    """The `Files:` paragraphs of a machine-readable (DEP-5) debian/copyright file."""
    stanzas = []
    for paragraph in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in paragraph.splitlines():
            if line[:1].isspace() and current is not None:
                current.append(line.strip())
            elif ":" in line:
                key, value = line.split(":", 1)
                current = fields.setdefault(key.strip().lower(), [])
                current.append(value.strip())
        if "files" in fields and "license" in fields:
            stanzas.append(
                CopyrightStanza(
                    patterns=tuple(" ".join(fields["files"]).split()),
                    copyright="; ".join(line for line in fields.get("copyright", []) if line),
                    licence=fields["license"][0],
                )
            )
    return stanzas


def stanza_for(stanzas: list[CopyrightStanza], source_path: str) -> CopyrightStanza:
    """The stanza that governs a file: by DEP-5 rules, the last one whose pattern matches."""
    matching = [s for s in stanzas if any(fnmatch.fnmatchcase(source_path, p) for p in s.patterns)]
    if not matching:
        raise ValueError(f"debian/copyright has no Files: stanza covering {source_path}")
    return matching[-1]


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file (hashlib reads it in chunks)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def expected_files(packages: tuple[Package, ...]) -> set[str]:
    return {package.stored_name(photo) for package in packages for photo in package.photos}


def is_up_to_date(output: Path, packages: tuple[Package, ...]) -> bool:
    """True when the manifest lists exactly the allow-list and every file matches its hash."""
    manifest = output / MANIFEST_NAME
    if not manifest.exists():
        return False
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if {row["file"] for row in rows} != expected_files(packages):
        return False
    return all(
        (output / row["file"]).is_file() and sha256_of(output / row["file"]) == row["sha256"]
        for row in rows
    )


def require_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"error: {', '.join(missing)} not found. This script downloads Debian packages and "
            "needs a Debian or Ubuntu system with apt."
        )


def download_packages(directory: Path, packages: tuple[Package, ...]) -> dict[str, Path]:
    """`apt-get download` every package into `directory`; returns package name -> .deb."""
    names = [package.name for package in packages]
    result = subprocess.run(
        ["apt-get", "download", *names], cwd=directory, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(
            f"error: apt-get download {' '.join(names)} failed:\n{result.stderr.strip()}\n"
            "If it cannot locate a package, the package lists may be missing or stale: "
            "run `apt-get update` (as root) and try again."
        )
    debs = {}
    for deb in directory.glob("*.deb"):
        debs[deb_field(deb, "Package")] = deb
    return debs


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def collect(package: Package, deb: Path, work: Path, output: Path) -> list[dict[str, str]]:
    """Extract one package and copy its allow-listed photos; returns their manifest rows."""
    root = work / package.name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    version = deb_field(deb, "Version")
    stanzas = parse_copyright(
        (root / "usr/share/doc" / package.name / "copyright").read_text(encoding="utf-8")
    )
    rows = []
    for photo in package.photos:
        original = package.install_root + photo
        source = root / original
        # A symlink would mean the package now ships this image as an alias of another one.
        if source.is_symlink() or not source.is_file():
            raise SystemExit(
                f"error: {package.name} {version} no longer ships {original} as a file; "
                "review the allow-list in this script"
            )
        with Image.open(source) as image:
            width, height = image.size
            image.verify()
        stanza = stanza_for(stanzas, package.source_root + photo)
        target = output / package.stored_name(photo)
        digest = sha256_of(source)
        if not (target.is_file() and sha256_of(target) == digest):
            shutil.copyfile(source, target)
        rows.append(
            {
                "file": target.name,
                "package": package.name,
                "package_version": version,
                "original_path": "/" + original,
                "width": str(width),
                "height": str(height),
                "sha256": digest,
                "licence": stanza.licence,
                "copyright": stanza.copyright,
            }
        )
    return rows


def remove_stale_files(output: Path, packages: tuple[Package, ...]) -> None:
    """Delete photos this script stored earlier that the allow-list no longer names."""
    keep = expected_files(packages)
    for package in packages:
        for stale in output.glob(f"{package.name}__*"):
            if stale.name not in keep:
                print(f"removing {stale.name}: no longer in the allow-list")
                stale.unlink()


def write_manifest(rows: list[dict[str, str]], output: Path) -> None:
    """Write MANIFEST.csv last and atomically, so that it only ever describes a full set."""
    temporary = output / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["file"]))
    os.replace(temporary, output / MANIFEST_NAME)


def summarise(output: Path, packages: tuple[Package, ...]) -> None:
    with (output / MANIFEST_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    megapixels = sum(int(row["width"]) * int(row["height"]) for row in rows) / 1e6
    print(f"{len(rows)} photographs, {megapixels:.1f} megapixels, in {output}")
    for package in packages:
        count = sum(row["package"] == package.name for row in rows)
        print(f"  {package.name}: {count}")


def build(output: Path, packages: tuple[Package, ...] = PACKAGES) -> None:
    """Copy the allow-listed photos of ``packages`` into ``output`` with their manifest."""
    output.mkdir(parents=True, exist_ok=True)
    if is_up_to_date(output, packages):
        print(f"{output / MANIFEST_NAME} is up to date; nothing to do")
    else:
        require_tools()
        with tempfile.TemporaryDirectory(prefix="photo-dataset-") as scratch:
            work = Path(scratch)
            debs = download_packages(work, packages)
            rows = []
            for package in packages:
                print(f"extracting {debs[package.name].name}")
                rows += collect(package, debs[package.name], work, output)
        remove_stale_files(output, packages)
        write_manifest(rows, output)
    summarise(output, packages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, required=True, help="directory for the photos and MANIFEST.csv"
    )
    build(parser.parse_args().output)


if __name__ == "__main__":
    main()
