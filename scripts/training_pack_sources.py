"""Which real photographs the training pack takes from each Debian package, and their licences.

Why: the training pack (scripts/build_training_pack.py) needs many more real camera
photographs than the 38 wallpapers of scripts/build_photo_dataset.py, and on these machines
the package registries are the only source. The Debian packages that hold more photos also
hold drawings, paintings, renders, cut-out sprites and test fixtures, which would teach a
codec the statistics of graphics. So every file taken here is named by an explicit
allow-list (or, for GCompris' groups of photos, a path pattern with the exact number of
files that were viewed), each checked by eye on contact sheets; docs/training-data.md lists
what was left out and why.

Every photo carries two licence statements:

- ``debian_licence``: what the package's ``/usr/share/doc/<package>/copyright`` says for
  the file (a DEP-5 ``Files:`` stanza, or for a free-text copyright file an explicit
  statement whose wording this module checks is still there);
- ``licence`` and ``copyright``: the most specific statement the package ships for that
  very file (GCompris' per-folder README, Palapeli's ``.desktop`` metadata, LXQt's
  wallpaper ``License`` file), falling back to debian/copyright where there is none.
  ``licence_source`` names the file it was read from.

A package whose files or statements no longer match what was reviewed is an error, never
a silent change of the training data.
"""

from __future__ import annotations

import fnmatch
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

from PIL import Image

from build_photo_dataset import CopyrightStanza, parse_copyright, stanza_for
from resource_bundles import BundleEntry, eet_jpegs, rcc_entries


class SourceError(RuntimeError):
    """A package no longer matches the reviewed allow-list or licence statement."""


@dataclass(frozen=True)
class Licence:
    """A licence statement and the package file it was read from."""

    licence: str
    copyright: str
    stated_in: str


@dataclass(frozen=True)
class SourcePhoto:
    """One photograph as its package ships it (bytes of a file or of a bundle member)."""

    package: str
    version: str
    original_path: str  # '/usr/...' or '/usr/...bundle:member'
    stem: str  # unique within its package; names the pack's files
    data: bytes = field(repr=False)
    licence: Licence
    debian_licence: str


@dataclass(frozen=True)
class PackageTree:
    """An unpacked Debian package (``dpkg-deb -x``), its name and version."""

    name: str
    version: str
    root: Path

    def path(self, relative: str) -> Path:
        """A regular file of the package; symlinks are refused (an alias, not a photo)."""
        path = self.root / relative
        if path.is_symlink() or not path.is_file():
            raise SourceError(f"{self.name} {self.version} no longer ships /{relative} as a file; "
                              "review the allow-list in scripts/training_pack_sources.py")
        return path

    def read_text(self, relative: str) -> str:
        return self.path(relative).read_text(encoding="utf-8", errors="replace")

    @property
    def copyright_path(self) -> str:
        return f"usr/share/doc/{self.name}/copyright"

    @cached_property
    def dep5(self) -> list[CopyrightStanza]:
        """The DEP-5 stanzas of the package's debian/copyright (empty if free text), read once."""
        return parse_copyright(self.read_text(self.copyright_path))

    def dep5_licence(self, source_path: str) -> Licence:
        """The licence debian/copyright gives a file of the upstream tree (DEP-5 rules)."""
        stanzas = self.dep5
        if not stanzas:
            raise SourceError(f"{self.name}: {self.copyright_path} is not machine-readable (DEP-5)")
        stanza = stanza_for(stanzas, source_path)
        return Licence(stanza.licence, stanza.copyright, "/" + self.copyright_path)


# --- licence statements read from files other than debian/copyright --------------------


def normalise_licence(text: str) -> str:
    """Upstream spellings as SPDX-like ids: 'CC-BY-SA 4.0' -> 'CC-BY-SA-4.0', 'Public Domain'
    -> 'public-domain' (debian/copyright's spelling)."""
    text = " ".join(text.split())
    if text.lower() == "public domain":
        return "public-domain"
    return text.replace(" ", "-")


@dataclass(frozen=True)
class Statement:
    """A licence that a package states in free text, with the wording that must still be there.

    ``evidence`` strings are looked up in ``file`` on every build, so that a package whose
    statement changed fails loudly instead of being recorded under an outdated licence.
    """

    file: str
    licence: str
    copyright: str
    evidence: tuple[str, ...]

    def check(self, tree: PackageTree) -> Licence:
        text = " ".join(tree.read_text(self.file).split())
        missing = [e for e in self.evidence if " ".join(e.split()) not in text]
        if missing:
            raise SourceError(f"{tree.name} {tree.version}: /{self.file} no longer says {missing!r}; "
                              "review its licence in scripts/training_pack_sources.py")
        return Licence(self.licence, self.copyright, "/" + self.file)


@dataclass(frozen=True)
class Credit:
    """One stanza of a GCompris resource README: who, under what licence, from where."""

    files: tuple[str, ...]
    licence: str
    copyright: str


FIELD = re.compile(r"^([A-Za-z][A-Za-z-]*):\s*(.*)$")


def parse_credits(text: str) -> list[Credit]:
    """The stanzas of a GCompris README: blank-line separated ``Key: value`` blocks.

    The READMEs are hand-written: ``Files:`` may hold names on its own line or on the lines
    after it, or be missing with the names listed bare; ``Comment:`` and ``Source:`` are
    kept in the copyright text because they name the original photograph and its author.
    """
    credits = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        files: list[str] = []
        for line in (raw.strip() for raw in block.splitlines()):
            match = FIELD.match(line)
            if match and not match.group(1).lower().startswith("http"):
                key, value = match.group(1).lower(), match.group(2).strip()
                if key == "files":
                    files += value.replace(",", " ").split()
                else:
                    fields[key.rstrip("s") if key == "comments" else key] = value
            elif line:
                files.append(line)
        if files and "license" in fields:
            holder = "; ".join(
                f"{label}{fields[key]}" for key, label in (("copyright", ""), ("source", "source: "),
                                                           ("comment", "note: "))
                if fields.get(key)
            )
            credits.append(Credit(tuple(files), normalise_licence(fields["license"]), holder))
    return credits


def parse_desktop_entry(text: str) -> dict[str, str]:
    """``key=value`` lines of a freedesktop ``.desktop`` file (all groups, first wins)."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            entries.setdefault(key.strip(), value.strip())
    return entries


# --- plain files -------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSource:
    """Photos shipped as plain image files in one folder of a package.

    ``source_root`` maps the folder to its upstream path, which debian/copyright uses.
    ``licence_of`` gives the most specific statement for one photo (default: debian/copyright).
    """

    package: str
    install_root: str
    source_root: str
    photos: tuple[str, ...]
    licence_of: Callable[[PackageTree, FileSource, str], Licence] | None = None
    debian_statement: Statement | None = None  # for free-text (non-DEP-5) copyright files

    def debian_licence(self, tree: PackageTree, photo: str) -> Licence:
        if self.debian_statement is not None:
            return self.debian_statement.check(tree)
        return tree.dep5_licence(self.source_root + photo)

    def collect(self, tree: PackageTree) -> list[SourcePhoto]:
        photos = []
        for photo in self.photos:
            debian = self.debian_licence(tree, photo)
            licence = self.licence_of(tree, self, photo) if self.licence_of else debian
            photos.append(SourcePhoto(
                package=tree.name,
                version=tree.version,
                original_path="/" + self.install_root + photo,
                stem=PurePosixPath(photo).stem,
                data=tree.path(self.install_root + photo).read_bytes(),
                licence=licence,
                debian_licence=debian.licence,
            ))
        return photos


LXQT_STATEMENT = Statement(
    file="usr/share/lxqt/wallpapers/License",
    licence="CC-BY-SA-3.0",
    copyright="2022 LXQt Project Team",
    evidence=("Copyright 2022: LXQt Project Team", "Licensed under https://creativecommons.org/licenses/by-sa/3.0/"),
)
# The License file credits these photos to one photographer, by short names.
LXQT_CREDITED = {
    "beam.png", "flowers.png", "butterfly.png", "fog.jpg", "this-is-not-windows.jpg",
    "appleflower.png", "after-the-rain.jpg", "drop.png",
}
LXQT_CREDIT_LINE = "stefonarch (standreas@riseup.net) beam,flowers,butterfly,fog,not-windows,appleflowers,after-the-rain,drop;"


def lxqt_licence(tree: PackageTree, source: FileSource, photo: str) -> Licence:
    """LXQt's wallpapers/License (CC-BY-SA-3.0), with the photographer it credits."""
    if photo not in LXQT_CREDITED:
        return LXQT_STATEMENT.check(tree)
    credited = Statement(LXQT_STATEMENT.file, LXQT_STATEMENT.licence,
                         f"{LXQT_STATEMENT.copyright}; photo: stefonarch",
                         (*LXQT_STATEMENT.evidence, LXQT_CREDIT_LINE))
    return credited.check(tree)


def palapeli_licence(tree: PackageTree, source: FileSource, photo: str) -> Licence:
    """A Palapeli puzzle's ``.desktop`` file: author, licence and the Wikimedia page."""
    desktop = source.install_root + PurePosixPath(photo).with_suffix(".desktop").as_posix()
    entry = parse_desktop_entry(tree.read_text(desktop))
    try:
        author, licence = entry["X-KDE-PluginInfo-Author"], entry["X-KDE-PluginInfo-License"]
    except KeyError as missing:
        raise SourceError(f"{tree.name}: /{desktop} has no {missing}") from None
    website = entry.get("X-KDE-PluginInfo-Website", "")
    holder = f"{author}; source: {website}" if website else author
    return Licence(normalise_licence(licence), holder, "/" + desktop)


# Each photo below was viewed on a contact sheet. docs/training-data.md lists what each
# package holds besides, and why it was left out.
FILE_SOURCES = (
    FileSource(
        package="lxqt-themes",
        install_root="usr/share/lxqt/wallpapers/",
        source_root="wallpapers/",
        photos=("Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png",
                "beam.png", "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg",
                "this-is-not-windows.jpg"),
        licence_of=lxqt_licence,
    ),
    FileSource(
        package="tuxpaint-data",
        install_root="usr/share/tuxpaint/templates/",
        source_root="templates/",
        # mossy_bark.jpg is left out: a black bar covers its bottom sixth.
        photos=tuple(f"{name}.jpg" for name in (
            "burnt_bark", "cliff", "corn_maze", "jellyfish", "lighthouse", "mossy_log", "mudstone",
            "ocean_splash", "ocean_waves", "redwoods_above", "rocks", "sheep", "spiders_web",
            "sun_behind_clouds", "sun_behind_leaves", "trees_above", "trees_at_dusk", "wool_mill_machine",
        )),
    ),
    FileSource(
        package="digikam-data",
        install_root="usr/share/digikam/about/images/",
        source_root="",
        photos=("body-background.jpg",),
        # digikam-data's copyright file is free text; it covers the package as a whole.
        debian_statement=Statement(
            file="usr/share/doc/digikam-data/copyright",
            licence="GPL-2+",
            copyright="digiKam developers",
            evidence=("almost all software is GPL (exceptions listed below)",
                      "either version 2 of the License, or (at your option) any later version"),
        ),
    ),
    FileSource(
        package="palapeli-data",
        install_root="usr/share/palapeli/collection/",
        source_root="puzzles/",
        photos=("castle-maintenon.jpg", "cincinnati-bridge.jpg", "citrus-fruits.jpg",
                "european-honey-bee.jpg", "panther-chameleon-female.jpg"),
        licence_of=palapeli_licence,
    ),
)


# --- GCompris: WebP photos inside Qt resource bundles ---------------------------------

GCOMPRIS = "gcompris-qt-data"
GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc/"
GCOMPRIS_ACTIVITIES = "gcompris/src/activities/"


@dataclass(frozen=True)
class BundleGroup:
    """The photos of one GCompris activity: bundle members matching ``pattern``.

    ``pattern`` is relative to the activity's folder, one shell pattern per path component
    (a ``*`` never crosses a ``/``); ``count`` is how many files matched when they were
    viewed, checked on every build so that a new or renamed file is reviewed first.
    """

    activity: str
    patterns: tuple[str, ...]
    count: int

    def matches(self, relative: str) -> bool:
        return any(path_matches(relative, pattern) for pattern in self.patterns)


def path_matches(path: str, pattern: str) -> bool:
    """Shell-pattern match component by component, so that ``*`` stays inside one folder."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


# Left out: lang (drawings), paintings, babyshapes, chronos, solar_system and the other
# activities (drawings, cut-outs, sprites under 256 px); clickgame's fish sprites; the
# categorization photos (at most 400x320 px, below a training crop, many cut out on white);
# details' puzzle pieces (_0, _1, ...: crops of the backgrounds) and its Van Gogh paintings.
GCOMPRIS_GROUPS = (
    BundleGroup("erase", ("resource/*.webp",), 33),
    BundleGroup("clickgame", ("resource/sea[1-6].webp",), 6),
    BundleGroup("explore_monuments", ("resource/*/*.webp",), 49),
    BundleGroup("explore_world_animals", ("resource/animals/*.webp",), 15),
    BundleGroup("explore_farm_animals", ("resource/animals/*.webp",), 9),
    BundleGroup("explore_world_music", ("resource/music/*.webp",), 9),
    BundleGroup("details", tuple(f"resource/image/{name}_background.webp" for name in (
        "Chenonceau", "EgeskovSlotSpejling", "EilanDonanCastle", "FanoeWindmill", "GizahPyramids",
        "Louvre_2007_02_24_c", "NDP", "Nagoya", "Neuschwanstein", "OperaSidney", "TajMahal",
        "TourEiffel", "TowerBridgeLondon",
    )), 13),
)


def is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


# Files whose README stanza misspells their name (README -> file), checked by eye.
GCOMPRIS_README_SPELLINGS = {
    "gcompris/src/activities/explore_monuments/resource/germany/aulaPalatina.webp":
        "gcompris/src/activities/explore_monuments/resource/germany/audaPalatina.webp",
}


def gcompris_credit(bundle: str, entries: dict[str, bytes], member: str) -> Licence:
    """The README stanza naming ``member``, from the nearest README at or above its folder."""
    member = GCOMPRIS_README_SPELLINGS.get(member, member)
    folder = PurePosixPath(member).parent
    while str(folder).startswith(GCOMPRIS_ACTIVITIES.rstrip("/")):
        for name in ("README", "readme"):
            readme = f"{folder}/{name}"
            if readme in entries:
                relative = PurePosixPath(member).relative_to(folder).as_posix()
                for credit in parse_credits(entries[readme].decode("utf-8", errors="replace")):
                    if relative in credit.files:
                        return Licence(credit.licence, credit.copyright, f"/{bundle}:{readme}")
        folder = folder.parent
    raise SourceError(f"{GCOMPRIS}: no README stanza names {member}; its licence is unknown")


def gcompris_group(tree: PackageTree, group: BundleGroup) -> Iterator[SourcePhoto]:
    """The photos of one activity's bundle, each with its README credit."""
    bundle = f"{GCOMPRIS_RCC}{group.activity}.rcc"
    entries = {entry.path: entry.data for entry in rcc_entries(tree.path(bundle).read_bytes())}
    prefix = f"{GCOMPRIS_ACTIVITIES}{group.activity}/"
    members = sorted(p for p in entries if p.startswith(prefix) and group.matches(p[len(prefix):]))
    if len(members) != group.count:
        raise SourceError(f"{GCOMPRIS} {tree.version}: {bundle} has {len(members)} files matching "
                          f"{group.patterns}, {group.count} were reviewed; review the allow-list")
    for member in members:
        if not is_webp(entries[member]):
            raise SourceError(f"{GCOMPRIS}: /{bundle}:{member} is not a WebP image")
        relative = PurePosixPath(member[len(prefix):])
        yield SourcePhoto(
            package=tree.name,
            version=tree.version,
            original_path=f"/{bundle}:{member}",
            stem="-".join((group.activity, *relative.parent.parts[1:], relative.stem)),
            data=entries[member],
            licence=gcompris_credit(bundle, entries, member),
            debian_licence=tree.dep5_licence(member.removeprefix("gcompris/")).licence,
        )


def gcompris_photos(tree: PackageTree) -> list[SourcePhoto]:
    return [photo for group in GCOMPRIS_GROUPS for photo in gcompris_group(tree, group)]


# --- Enlightenment: JPEG wallpapers inside EET (.edj) files ---------------------------

ENLIGHTENMENT = "enlightenment-data"
ENLIGHTENMENT_BACKGROUNDS = "usr/share/enlightenment/data/backgrounds/"
# Left out as artwork: Dunes, Flat-Fan, Flat-Stone-Pattern, Paper-Flower, Sunset-Hills
# (flat polygons with grain) and the four Squiggle files (no JPEG inside).
ENLIGHTENMENT_PHOTOS = (
    "Bamboo", "Foggy-Trees", "God-Rays", "Green-Maple", "Lichen-Branches", "Mountain", "Peaks",
    "Red-Maple", "Sea-of-Lanterns", "Snow-Trees", "Spruce-Needles", "Sunset-Clouds", "White-Flower",
    "Yellow-Flower",
)


def pixel_count(data: bytes) -> int:
    """Width x height from an image's header, without decoding it."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size[0] * image.size[1]


def largest_jpeg(entries: list[BundleEntry], where: str) -> BundleEntry:
    """The full-size photo of an .edj wallpaper: its largest JPEG (the others are smaller copies)."""
    if not entries:
        raise SourceError(f"{where} holds no JPEG image")
    return max(entries, key=lambda entry: (pixel_count(entry.data), entry.path))


def enlightenment_photos(tree: PackageTree) -> list[SourcePhoto]:
    photos = []
    for name in ENLIGHTENMENT_PHOTOS:
        bundle = f"{ENLIGHTENMENT_BACKGROUNDS}{name}.edj"
        entry = largest_jpeg(eet_jpegs(tree.path(bundle).read_bytes()), f"{ENLIGHTENMENT} /{bundle}")
        debian = tree.dep5_licence(f"data/backgrounds/{name}.edj")
        photos.append(SourcePhoto(
            package=tree.name,
            version=tree.version,
            original_path=f"/{bundle}:{entry.path}",
            stem=name,
            data=entry.data,
            licence=debian,
            debian_licence=debian.licence,
        ))
    return photos


# --- all packages -----------------------------------------------------------------------

COLLECTORS: dict[str, Callable[[PackageTree], list[SourcePhoto]]] = {
    GCOMPRIS: gcompris_photos,
    ENLIGHTENMENT: enlightenment_photos,
    **{source.package: source.collect for source in FILE_SOURCES},
}


def selection_description() -> str:
    """A canonical text of every allow-list and statement here (for the pack's fingerprint)."""
    return repr((GCOMPRIS_GROUPS, GCOMPRIS_README_SPELLINGS, ENLIGHTENMENT_PHOTOS,
                 [(s.package, s.install_root, s.source_root, s.photos, s.debian_statement,
                   getattr(s.licence_of, "__name__", None)) for s in FILE_SOURCES],
                 LXQT_STATEMENT, sorted(LXQT_CREDITED), LXQT_CREDIT_LINE))
