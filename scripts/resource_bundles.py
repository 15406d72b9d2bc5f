"""Read the files inside two resource-bundle formats that Debian packages ship photos in.

Why: some of the best-licensed real photographs installable on these machines are not
plain files. GCompris (``gcompris-qt-data``) compiles its images into Qt resource bundles
(``.rcc``), and Enlightenment (``enlightenment-data``) stores its wallpapers inside EET
files (``.edj``). Neither Qt's ``rcc`` tool nor Enlightenment's ``eet`` tool is
installable without pulling in a desktop stack, and both formats are small and documented
by their sources, so they are read here with the standard library only.

Both readers return every stored file with its name inside the bundle, so that callers
can choose photos by name (an allow-list or explicit deny rules) and record where each one
came from. They raise :class:`BundleFormatError` on anything they do not understand rather
than guessing.

- Qt rcc, versions 1-3 (``src/corelib/io/qresource.cpp`` and ``src/tools/rcc/rcc.cpp``):
  a header (``qres``, version, tree/data/names offsets, version 3 adds flags), a tree of
  14-byte (version 1) or 22-byte (versions 2, 3) nodes, a names table of UTF-16BE strings
  and a data area of length-prefixed blobs; a blob may be zlib-compressed (qCompress: a
  4-byte big-endian uncompressed length, then a zlib stream) or zstd-compressed.
- EET, version 2 (``src/lib/eet/eet_lib.c``, magic ``0x1ee70f42``): a header (magic,
  entry count, dictionary count), 24-byte directory entries (offset, stored size, data
  size, name offset, name size, flags) and the data. Edje stores an opaque image's lossy
  form as a bare JPEG stream, which is what :func:`eet_jpegs` returns.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

JPEG_START = b"\xff\xd8\xff"


class BundleFormatError(ValueError):
    """The bytes are not a bundle of the expected kind, or use a feature not handled here."""


@dataclass(frozen=True)
class BundleEntry:
    """One stored file: its path inside the bundle and its (decompressed) bytes."""

    path: str
    data: bytes


# --- Qt resource bundles (.rcc) --------------------------------------------------------

RCC_MAGIC = b"qres"
RCC_FLAG_COMPRESSED = 0x01
RCC_FLAG_DIRECTORY = 0x02
RCC_FLAG_COMPRESSED_ZSTD = 0x04


@dataclass(frozen=True)
class _RccLayout:
    blob: bytes
    version: int
    tree: int
    data: int
    names: int

    @property
    def node_size(self) -> int:
        """Version 1 nodes are 14 bytes; versions 2 and 3 append an 8-byte modification time."""
        return 14 if self.version == 1 else 22


def _unpack(blob: bytes, fmt: str, offset: int) -> tuple:
    """struct.unpack_from that names the problem instead of raising struct.error."""
    try:
        return struct.unpack_from(fmt, blob, offset)
    except struct.error:
        raise BundleFormatError(f"truncated bundle: {struct.calcsize(fmt)} bytes needed at offset {offset}") from None


def _rcc_layout(blob: bytes) -> _RccLayout:
    if blob[:4] != RCC_MAGIC:
        raise BundleFormatError("not a Qt resource bundle (no 'qres' magic)")
    version, tree, data, names = _unpack(blob, ">IIII", 4)
    if version not in (1, 2, 3):
        raise BundleFormatError(f"unsupported Qt resource bundle version {version}")
    return _RccLayout(blob, version, tree, data, names)


def _rcc_name(layout: _RccLayout, offset: int) -> str:
    (length,) = _unpack(layout.blob, ">H", layout.names + offset)
    start = layout.names + offset + 6  # 2-byte length, 4-byte hash
    raw = layout.blob[start:start + 2 * length]
    if len(raw) != 2 * length:
        raise BundleFormatError(f"truncated name at offset {offset}")
    return raw.decode("utf-16-be")


def _rcc_blob(layout: _RccLayout, offset: int, flags: int, path: str) -> bytes:
    (size,) = _unpack(layout.blob, ">I", layout.data + offset)
    start = layout.data + offset + 4
    raw = layout.blob[start:start + size]
    if len(raw) != size:
        raise BundleFormatError(f"{path}: data runs past the end of the bundle")
    if flags & RCC_FLAG_COMPRESSED_ZSTD:
        raise BundleFormatError(f"{path}: zstd-compressed entries are not supported")
    if flags & RCC_FLAG_COMPRESSED:
        (expected,) = _unpack(raw, ">I", 0)
        data = zlib.decompress(raw[4:])
        if len(data) != expected:
            raise BundleFormatError(f"{path}: decompressed to {len(data)} bytes, header says {expected}")
        return data
    return raw


def _rcc_walk(layout: _RccLayout, node: int, prefix: str, depth: int) -> Iterator[BundleEntry]:
    if depth > 64:
        raise BundleFormatError("directory tree deeper than 64 levels (a cycle?)")
    base = layout.tree + node * layout.node_size
    name_offset, flags = _unpack(layout.blob, ">IH", base)
    name = "" if node == 0 else _rcc_name(layout, name_offset)
    path = f"{prefix}/{name}" if node else ""
    if flags & RCC_FLAG_DIRECTORY:
        count, first = _unpack(layout.blob, ">II", base + 6)
        for child in range(first, first + count):
            yield from _rcc_walk(layout, child, path, depth + 1)
    else:
        (data_offset,) = _unpack(layout.blob, ">I", base + 10)  # after country and language
        yield BundleEntry(path.lstrip("/"), _rcc_blob(layout, data_offset, flags, path))


def rcc_entries(blob: bytes) -> list[BundleEntry]:
    """Every file in a Qt resource bundle, as (path without the leading '/', bytes).

    Node 0 is the root directory; a directory node lists its children as a contiguous
    run of node indices. Files in several locales appear once per locale.
    """
    return list(_rcc_walk(_rcc_layout(blob), 0, "", 0))


# --- Enlightenment EET files (.edj) ----------------------------------------------------

EET_MAGIC = 0x1EE70F42
EET_FLAG_COMPRESSED = 0x1
EET_FLAG_CIPHERED = 0x2
EET_FLAG_ALIAS = 0x4
EET_ENTRY_SIZE = 24


@dataclass(frozen=True)
class EetEntry:
    """A directory entry of an EET file; ``stored`` is the bytes as they lie in the file."""

    name: str
    flags: int
    stored: bytes

    @property
    def is_plain(self) -> bool:
        """Neither compressed, encrypted nor an alias: the bytes are the entry's data."""
        return not self.flags & (EET_FLAG_COMPRESSED | EET_FLAG_CIPHERED | EET_FLAG_ALIAS)


def eet_entries(blob: bytes) -> list[EetEntry]:
    """The directory of an EET (version 2) file, with each entry's stored bytes."""
    magic, count, _dictionary = _unpack(blob, ">III", 0)
    if magic != EET_MAGIC:
        raise BundleFormatError(f"not an EET file (magic {magic:#010x}, expected {EET_MAGIC:#010x})")
    entries = []
    for index in range(count):
        offset, size, _data_size, name_offset, name_size, flags = _unpack(
            blob, ">6I", 12 + index * EET_ENTRY_SIZE
        )
        name = blob[name_offset:name_offset + name_size].rstrip(b"\0")
        stored = blob[offset:offset + size]
        if len(stored) != size or not name:
            raise BundleFormatError(f"entry {index} lies outside the file")
        entries.append(EetEntry(name.decode("utf-8"), flags, stored))
    return entries


def eet_jpegs(blob: bytes) -> list[BundleEntry]:
    """The entries of an EET file that are bare JPEG streams (Edje's lossy images).

    Entries that are compressed, encrypted or aliases, and those whose data does not start
    with a JPEG start-of-image marker (lossless images, alpha-masked JPEG pairs, scripts,
    the compiled layout) are not returned.
    """
    return [
        BundleEntry(entry.name, entry.stored)
        for entry in eet_entries(blob)
        if entry.is_plain and entry.stored.startswith(JPEG_START)
    ]
