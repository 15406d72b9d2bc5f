"""Archive keys as relative file paths: reversible, and never a way out of the output prefix.

A key is untrusted input (it came from a listing, a manifest or a Parquet column), yet
restored images are written under names derived from it. The mapping keeps ordinary keys
readable (``photos/cat.jpg`` -> ``photos/cat.jpg.png``: the key's folders become folders,
and the suffix is appended, never substituted, so ``a.jpg`` and ``a.png`` cannot collide)
and makes every other key safe by percent-encoding, segment by segment:

- ``%``, ``\\``, ``~`` (the shortening marker, below), control characters (Unicode
  category C*) and the characters Windows forbids in names (``<>:"|?*``) become ``%XX``
  escapes of their UTF-8 bytes;
- a segment that is ``.`` or ``..`` is written ``%2E`` / ``%2E%2E``; an empty segment (a
  leading ``/`` of an absolute key, ``a//b``) is written ``%``;
- a segment longer than 200 bytes is cut and given ``~`` and the SHA-256 of the whole
  segment (all 256 bits, in hex). Only shortening writes a bare ``~``, so no key can spell
  another's shortened name, and telling two long segments apart would take a SHA-256
  collision.

- a folder segment (any but the last) whose :func:`fold` ends with the suffix (``.png``)
  has its last character escaped (``foo.png/bar`` -> ``foo.pn%67/bar.png``): otherwise the
  folder ``foo.png`` of that key and the file ``foo.png`` of the key ``foo`` would be the
  same name, and one of the two could not be written. File names always end with the
  suffix and folder names never do, even case-folded, so no key's file can be another
  key's folder.

Because ``%`` itself is always escaped, the mapping is injective (no two keys share a
path) and, below the length limit, :func:`path_to_key` inverts it. No result can contain
``..``, an absolute path, or a separator other than the key's own ``/``.

Injective is not enough where names are compared case- or normalisation-insensitively
(macOS, Windows, some S3 gateways): ``A.jpg`` and ``a.jpg``, or ``é`` composed (NFC) and
decomposed (NFD), are distinct keys whose paths name one file there. :func:`fold` is that
comparison; a restore gives every key but one of a group whose paths fold together its
:func:`alternative_path`, and checks at write time which key an existing file holds
(``pipeline.restore_archive``).
"""

from __future__ import annotations

import hashlib
import posixpath
import unicodedata
from urllib.parse import unquote

_ESCAPED = frozenset('%\\~<>:"|?*')
_EMPTY_SEGMENT = "%"
MAX_SEGMENT_BYTES = 200  # file systems allow 255; room for the suffix and a hash


def key_to_path(key: str, suffix: str = ".png") -> str:
    """The relative path (``/``-separated) under which the image of ``key`` is written."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a string, got {type(key).__name__}")
    segments = [_encode_segment(s) for s in key.split("/")]
    folded_suffix = fold(suffix)
    segments[:-1] = [s[:-1] + _escape(s[-1]) if fold(s).endswith(folded_suffix) else s for s in segments[:-1]]
    segments[-1] += suffix
    path = "/".join(segments)
    if path.startswith("/") or ".." in path.split("/") or posixpath.normpath(path) != path:
        raise AssertionError(f"unsafe path {path!r} for key {key!r}")  # unreachable by construction
    return path


def alternative_path(key: str, suffix: str = ".png") -> str:
    """The path for ``key`` when :func:`key_to_path`'s name is taken by another key (its
    paths fold together, or a file there holds another key): the same folder, and the file
    name with ``~`` and the first 32 hex digits (128 bits) of the SHA-256 of the whole key
    before the suffix (``a.jpg`` -> ``a.jpg~<32 hex>.png``).

    A bare ``~`` is otherwise written only by shortening, followed by 64 hex digits, so no
    key's own path folds onto an alternative one, and two keys' alternatives are one name
    only if the first 128 bits of their hashes agree. 32 digits, not 64, keep a shortened
    name (200 bytes) with its suffix under the 255-byte limit of file names.
    """
    primary = key_to_path(key, suffix)
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{primary[: len(primary) - len(suffix)]}~{digest}{suffix}"


def fold(path: str) -> str:
    """``path`` as case- and normalisation-insensitive file systems compare names: Unicode
    canonical caseless matching (NFD, case fold, then NFC). Two paths with one fold may name
    one file on macOS, Windows or an S3 gateway backed by either."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", path).casefold())


def path_to_key(path: str, suffix: str = ".png") -> str:
    """Inverse of :func:`key_to_path` (for keys whose segments were not shortened; an
    :func:`alternative_path` is not inverted: the restore manifest names each key's file)."""
    if not path.endswith(suffix):
        raise ValueError(f"{path!r} does not end with {suffix!r}")
    segments = path[: len(path) - len(suffix)].split("/")
    return "/".join("" if s == _EMPTY_SEGMENT else unquote(s, errors="strict") for s in segments)


def is_safe_join(root: str, relative: str) -> bool:
    """Whether ``root/relative`` stays inside ``root`` (a last check before any write)."""
    root = posixpath.normpath(root)
    joined = posixpath.normpath(posixpath.join(root, relative))
    return not posixpath.isabs(relative) and joined.startswith(root.rstrip("/") + "/")


def _encode_segment(segment: str) -> str:
    if segment == "":
        return _EMPTY_SEGMENT
    if segment in (".", ".."):
        return "%2E" * len(segment)
    encoded = "".join(_escape(c) if c in _ESCAPED or unicodedata.category(c).startswith("C") else c
                      for c in segment)
    if len(encoded.encode()) > MAX_SEGMENT_BYTES:
        digest = hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest()
        head = encoded.encode()[: MAX_SEGMENT_BYTES - len(digest) - 1].decode(errors="ignore")
        encoded = f"{head.rstrip('%0123456789ABCDEF')}~{digest}"
    return encoded


def _escape(character: str) -> str:
    return "".join(f"%{b:02X}" for b in character.encode("utf-8", "surrogatepass"))
