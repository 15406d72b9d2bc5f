"""scripts/build_training_pack.py and its readers, without Debian downloads.

The bundle readers are tested on Qt rcc and EET bytes built here by the formats' rules;
the pack on the bundled example photos (real JPEGs, 480 px wide).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_training_pack import (
    MANIFEST_FIELDS,
    MANIFEST_NAME,
    SUMMARY_NAME,
    PackSettings,
    build_pack,
    central_window,
    is_up_to_date,
    make_views,
    signature,
)
from resource_bundles import BundleFormatError, eet_entries, eet_jpegs, rcc_entries
from training_pack_sources import (
    COLLECTORS,
    GCOMPRIS_GROUPS,
    Licence,
    PackageTree,
    SourceError,
    SourcePhoto,
    Statement,
    gcompris_credit,
    normalise_licence,
    parse_credits,
    parse_desktop_entry,
    path_matches,
)
from corrdiff.train_runtime import RandomCrops
from pipeline.image_folder import load_images

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = sorted((ROOT / "examples" / "photos").glob("*.jpg"))
# Small enough for 480 px examples: every photo gets s1 (a window), s2 and s4.
SMALL = PackSettings(quality=90, scales=(1, 2, 4), max_view_mpx=0.1, min_side=64, budget_mib=2.0, method=4)


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# --- Qt rcc -------------------------------------------------------------------------------


def make_rcc(files: dict[str, bytes], version: int = 3, compress: frozenset[str] = frozenset()) -> bytes:
    """A Qt resource bundle laid out as rcc writes it: breadth-first nodes, children contiguous."""
    tree: dict = {}
    for path in files:
        *folders, name = path.split("/")
        node = tree
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = path
    names, data_area, nodes = bytearray(), bytearray(), []
    name_offsets: dict[str, int] = {}

    def name_offset(name: str) -> int:
        if name not in name_offsets:
            name_offsets[name] = len(names)
            names.extend(struct.pack(">HI", len(name), 0) + name.encode("utf-16-be"))
        return name_offsets[name]

    nodes.append(None)  # the root, filled in below
    pending = [(0, "", tree)]
    while pending:
        index, name, content = pending.pop(0)
        if isinstance(content, dict):
            first = len(nodes)
            children = sorted(content.items())
            nodes.extend([None] * len(children))
            nodes[index] = struct.pack(">IHII", name_offset(name) if index else 0, 0x02, len(children), first)
            pending += [(first + i, child, value) for i, (child, value) in enumerate(children)]
        else:
            payload = files[content]
            flags = 0
            if content in compress:
                payload, flags = struct.pack(">I", len(payload)) + zlib.compress(payload), 0x01
            offset = len(data_area)
            data_area.extend(struct.pack(">I", len(payload)) + payload)
            nodes[index] = struct.pack(">IHHHI", name_offset(name), flags, 0, 0, offset)
    node_bytes = b"".join(n + (b"\0" * 8 if version > 1 else b"") for n in nodes)
    header_size = 24 if version == 3 else 20
    tree_offset = header_size
    data_offset = tree_offset + len(node_bytes)
    names_offset = data_offset + len(data_area)
    header = b"qres" + struct.pack(">IIII", version, tree_offset, data_offset, names_offset)
    if version == 3:
        header += struct.pack(">I", 1 if compress else 0)
    return header + node_bytes + bytes(data_area) + bytes(names)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_entries_reads_every_file_with_its_path(version):
    files = {
        "gcompris/src/activities/erase/resource/gorilla.webp": b"RIFF....WEBPVP8 gorilla",
        "gcompris/src/activities/erase/resource/README": b"Copyright: someone\nLicense: CC0-1.0\nFiles: gorilla.webp\n",
        "gcompris/src/activities/erase/Erase.qml": b"import QtQuick 2.12\n" * 50,
        "top.txt": b"",
    }
    blob = make_rcc(files, version, compress=frozenset({"gcompris/src/activities/erase/Erase.qml"}))
    assert {entry.path: entry.data for entry in rcc_entries(blob)} == files


def test_rcc_refuses_what_it_does_not_understand():
    blob = make_rcc({"a/b.webp": b"data"})
    with pytest.raises(BundleFormatError, match="qres"):
        rcc_entries(b"qrez" + blob[4:])
    with pytest.raises(BundleFormatError, match="version 9"):
        rcc_entries(blob[:4] + struct.pack(">I", 9) + blob[8:])
    with pytest.raises(BundleFormatError):
        rcc_entries(blob[:-10])  # the names table cut short


# --- EET (.edj) ---------------------------------------------------------------------------


def make_eet(entries: list[tuple[str, bytes, int]]) -> bytes:
    """An EET v2 file: header, 24-byte directory entries, names, then the data."""
    header_size = 12 + 24 * len(entries)
    names = b"".join(name.encode() + b"\0" for name, _, _ in entries)
    directory, name_at, data_at = b"", header_size, header_size + len(names)
    for name, data, flags in entries:
        directory += struct.pack(">6I", data_at, len(data), len(data), name_at, len(name) + 1, flags)
        name_at += len(name) + 1
        data_at += len(data)
    return struct.pack(">III", 0x1EE70F42, len(entries), 0) + directory + names + b"".join(d for _, d, _ in entries)


def test_eet_jpegs_returns_the_bare_jpeg_entries_only():
    large, small = jpeg_bytes(96, 64, 1), jpeg_bytes(24, 16, 2)
    blob = make_eet([
        ("edje/images/0", large, 0),
        ("edje/images/1", small, 0),
        ("edje/images/2", zlib.compress(large), 1),  # compressed: not a bare JPEG
        ("edje/images/3", b"\xbe\xef\xf0\x0d" + large, 0),  # a JPEG pair with alpha
        ("edje/file", b"\xf2\x0a CHK", 0x51),
    ])
    assert [e.name for e in eet_entries(blob)] == ["edje/images/0", "edje/images/1", "edje/images/2",
                                                   "edje/images/3", "edje/file"]
    jpegs = {entry.path: entry.data for entry in eet_jpegs(blob)}
    assert jpegs == {"edje/images/0": large, "edje/images/1": small}
    assert Image.open(io.BytesIO(jpegs["edje/images/0"])).size == (96, 64)


def test_eet_refuses_other_files_and_entries_outside_the_file():
    blob = make_eet([("edje/images/0", jpeg_bytes(8, 8), 0)])
    with pytest.raises(BundleFormatError, match="not an EET file"):
        eet_entries(b"\x1e\xe7\xff\x00" + blob[4:])
    with pytest.raises(BundleFormatError, match="outside the file"):
        eet_entries(blob[:-5])


# --- licences and allow-lists ---------------------------------------------------------------


def test_parse_credits_reads_the_readme_forms_gcompris_uses():
    text = (
        "Copyright: Timothee Giet, 2018-2020\nLicense: CC-BY-SA 4.0\nFiles:\nkey.svg\negypt/egypt.svg\n\n"
        "Copyright: Daniel Schwen\nLicense: CC-BY-SA 4.0\nSource: https://commons.wikimedia.org/wiki/File:X.jpg\n"
        "Files:\nwonders/chichenItza.webp\n\n"
        "Copyright: Sergio Cambelo\nFiles: giraffe.webp\nSource: https://example.org/g.jpg\nLicense: Public domain\n"
        "Comments: cropping, sharpening\n\n"
        "Copyright: 2000, 2008 Bruno Coudoin and others\nLicense: CC-BY 4.0\nEilanDonanCastle_0.webp\n"
        "EilanDonanCastle_background.webp\nComment: based on a photo by Guillaume Piolle\n\n"
        "a paragraph without a licence\n"
    )
    credits = {file: credit for credit in parse_credits(text) for file in credit.files}
    assert credits["wonders/chichenItza.webp"].licence == "CC-BY-SA-4.0"
    assert credits["wonders/chichenItza.webp"].copyright == \
        "Daniel Schwen; source: https://commons.wikimedia.org/wiki/File:X.jpg"
    assert credits["giraffe.webp"].licence == "public-domain"
    assert credits["giraffe.webp"].copyright.endswith("note: cropping, sharpening")
    assert credits["EilanDonanCastle_background.webp"].licence == "CC-BY-4.0"
    assert "Guillaume Piolle" in credits["EilanDonanCastle_background.webp"].copyright
    assert "a paragraph without a licence" not in credits


def test_gcompris_credit_uses_the_nearest_readme_and_refuses_an_unnamed_photo():
    base = "gcompris/src/activities/explore_monuments/resource"
    entries = {
        f"{base}/README": b"Copyright: Yann\nLicense: CC-BY-SA 4.0\nFiles:\nwonders/tajMahal.webp\n",
        f"{base}/wonders/tajMahal.webp": b"",
        f"{base}/wonders/petra.webp": b"",
    }
    licence = gcompris_credit("usr/share/gcompris-qt/rcc/x.rcc", entries, f"{base}/wonders/tajMahal.webp")
    assert licence == Licence("CC-BY-SA-4.0", "Yann", f"/usr/share/gcompris-qt/rcc/x.rcc:{base}/README")
    with pytest.raises(SourceError, match="petra.webp"):
        gcompris_credit("usr/share/gcompris-qt/rcc/x.rcc", entries, f"{base}/wonders/petra.webp")


def test_statement_fails_when_the_package_no_longer_says_it(tmp_path):
    (tmp_path / "License").write_text("Copyright 2022: LXQt Project Team\nLicensed under\n  CC-BY-SA 3.0 terms\n")
    tree = PackageTree("lxqt-themes", "1", tmp_path)
    ok = Statement("License", "CC-BY-SA-3.0", "LXQt", ("Licensed under CC-BY-SA 3.0 terms",))
    assert ok.check(tree) == Licence("CC-BY-SA-3.0", "LXQt", "/License")
    with pytest.raises(SourceError, match="no longer says"):
        Statement("License", "CC0-1.0", "LXQt", ("public domain",)).check(tree)
    with pytest.raises(SourceError, match="no longer ships"):
        Statement("Missing", "CC0-1.0", "LXQt", ()).check(tree)


def test_small_parsers_and_patterns():
    assert normalise_licence("CC-BY-SA  4.0") == "CC-BY-SA-4.0"
    assert normalise_licence("Public Domain") == "public-domain"
    entry = parse_desktop_entry("[Desktop Entry]\nName=Bridge\n# note=x\nX-KDE-PluginInfo-License=FDL\n")
    assert entry == {"Name": "Bridge", "X-KDE-PluginInfo-License": "FDL"}
    assert path_matches("resource/gorilla.webp", "resource/*.webp")
    assert not path_matches("resource/sub/gorilla.webp", "resource/*.webp")  # '*' stays in a folder
    assert path_matches("resource/sea4.webp", "resource/sea[1-6].webp")
    assert not path_matches("resource/seahorse.webp", "resource/sea[1-6].webp")


def test_allow_lists_leave_out_the_groups_reviewed_as_drawings_and_the_heldout_package():
    activities = {group.activity for group in GCOMPRIS_GROUPS}
    assert not activities & {"lang", "paintings", "babyshapes", "chronos", "solar_system", "categorization"}
    assert "libjxl-testdata" not in COLLECTORS  # scripts/heldout_photos.py --debian
    details = next(group for group in GCOMPRIS_GROUPS if group.activity == "details")
    assert details.matches("resource/image/NDP_background.webp")
    assert not details.matches("resource/image/Gogh4_background.webp")  # a Van Gogh painting
    assert not details.matches("resource/image/NDP_0.webp")  # a puzzle piece


# --- views ----------------------------------------------------------------------------------


def test_central_window_keeps_aspect_and_centre():
    assert central_window(400, 300, 120_000) is None
    left, top, right, bottom = central_window(4000, 3000, 120_000)
    width, height = right - left, bottom - top
    assert width * height <= 120_000 and abs(width / height - 4 / 3) < 0.01
    assert abs(left - (4000 - right)) <= 1 and abs(top - (3000 - bottom)) <= 1


def test_make_views_scales_windows_and_drops_small_views():
    image = Image.fromarray(np.zeros((800, 1200, 3), np.uint8))
    views = make_views(image, PackSettings(scales=(1, 2, 4), max_view_mpx=0.25, min_side=256))
    assert [(v.scale, v.image.size) for v in views] == [(1, (612, 408)), (2, (600, 400))]
    assert views[0].box == (294, 196, 906, 604) and views[1].box is None  # 300x200 at 1/4 is dropped


# --- the pack ---------------------------------------------------------------------------------


def example_photos() -> list[SourcePhoto]:
    return [
        SourcePhoto("examples", "1", f"/examples/photos/{path.name}", path.stem, path.read_bytes(),
                    Licence("CC-BY-4.0", "Aitzol Berasategi", "examples/photos/ATTRIBUTION.md"), "CC-BY-4.0")
        for path in EXAMPLES
    ]


def read_rows(directory: Path) -> list[dict[str, str]]:
    with (directory / MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pack")
    build_pack(example_photos(), output, SMALL, "selection-1")
    return output


def test_pack_holds_every_view_with_a_true_manifest(pack):
    rows = read_rows(pack)
    assert len(EXAMPLES) == 6 and len(rows) == 3 * len(EXAMPLES)
    assert tuple(rows[0]) == MANIFEST_FIELDS
    assert sorted(p.name for p in pack.glob("*.webp")) == sorted(r["file"] for r in rows)
    sources = {p.stem: p for p in EXAMPLES}
    for row in rows:
        data = (pack / row["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        stem = row["file"].split("__")[1]
        assert hashlib.sha256(sources[stem].read_bytes()).hexdigest() == row["source_sha256"]
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "WEBP" and image.size == (int(row["width"]), int(row["height"]))
        scale = int(row["scale"].split("/")[1])
        source_width = Image.open(sources[stem]).width
        assert row["file"].endswith(f"__s{scale}.webp")
        if row["crop_box"]:  # a window: at native (or downscaled) pixel size, within the cap
            assert int(row["width"]) * int(row["height"]) <= 0.1e6
        else:
            assert int(row["width"]) == round(source_width / scale)
        assert (row["licence"], row["debian_licence"]) == ("CC-BY-4.0", "CC-BY-4.0")


def test_pack_summary_counts_what_is_on_disk(pack):
    summary = json.loads((pack / SUMMARY_NAME).read_text())
    rows = read_rows(pack)
    assert summary["photos"] == len(EXAMPLES) and summary["files"] == len(rows)
    assert summary["bytes"] == sum((pack / r["file"]).stat().st_size for r in rows) <= SMALL.budget_mib * 2**20
    assert summary["megapixels"] == pytest.approx(sum(int(r["width"]) * int(r["height"]) for r in rows) / 1e6, abs=0.01)
    assert summary["settings"]["scales"] == [1, 2, 4]


def test_pack_is_deterministic(pack, tmp_path):
    build_pack(list(reversed(example_photos())), tmp_path, SMALL, "selection-1")
    for path in sorted(pack.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_up_to_date_only_when_settings_selection_and_every_hash_match(pack, tmp_path):
    assert is_up_to_date(pack, SMALL, "selection-1")
    assert not is_up_to_date(pack, SMALL, "selection-2")
    assert not is_up_to_date(pack, PackSettings(**{**SMALL.__dict__, "quality": 80}), "selection-1")
    assert not is_up_to_date(tmp_path, SMALL, "selection-1")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in pack.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    victim = copy / read_rows(copy)[0]["file"]
    victim.write_bytes(victim.read_bytes()[:-1])
    assert not is_up_to_date(copy, SMALL, "selection-1")
    build_pack(example_photos(), copy, SMALL, "selection-1")
    assert is_up_to_date(copy, SMALL, "selection-1")


def test_rebuild_with_fewer_scales_removes_stale_views(pack, tmp_path):
    build_pack(example_photos(), tmp_path, SMALL, "s")
    fewer = PackSettings(**{**SMALL.__dict__, "scales": (1, 2)})
    build_pack(example_photos(), tmp_path, fewer, "s")
    assert not list(tmp_path.glob("*__s4.webp"))
    assert len(list(tmp_path.glob("*.webp"))) == len(read_rows(tmp_path)) == 2 * len(EXAMPLES)


def test_over_budget_and_duplicate_photos_are_errors(tmp_path):
    with pytest.raises(ValueError, match="over its 0.01 MiB budget"):
        build_pack(example_photos(), tmp_path, PackSettings(**{**SMALL.__dict__, "budget_mib": 0.01}), "s")
    assert not list(tmp_path.iterdir())  # nothing written
    photos = example_photos()
    with pytest.raises(ValueError, match="same name"):
        build_pack(photos + photos[:1], tmp_path, SMALL, "s")


def test_a_heldout_photo_is_refused_even_cropped_resized_and_recompressed(tmp_path):
    heldout = Image.open(EXAMPLES[2]).convert("RGB")
    copy = io.BytesIO()
    width, height = heldout.size
    heldout.crop((6, 6, width - 6, height - 6)).resize((400, 300), Image.Resampling.BICUBIC).save(copy, "JPEG", quality=70)
    photos = example_photos()
    disguised = SourcePhoto("other", "1", "/copy.jpg", "copy", copy.getvalue(), photos[0].licence, "GPL-2+")
    signatures = np.stack([signature(heldout)])
    for candidate in (photos[2], disguised):
        with pytest.raises(ValueError, match="held-out"):
            build_pack([candidate], tmp_path, SMALL, "s", heldout=signatures)
    others = [p for i, p in enumerate(photos) if i != 2]
    build_pack(others, tmp_path, SMALL, "s", heldout=signatures)  # different photos pass
    assert len(read_rows(tmp_path)) == 3 * len(others)


def test_training_loader_reads_the_pack_and_skips_its_manifest(pack):
    images = load_images(str(pack), min_side=64)
    assert len(images) == len(read_rows(pack))
    assert all(url.endswith(".webp") for url, _ in images)
    assert all(image.dtype == np.uint8 and image.shape[2] == 3 for _, image in images)
    batch = RandomCrops([image for _, image in images], crop=64, seed=0).batch(4)
    assert tuple(batch.shape) == (4, 3, 64, 64)

