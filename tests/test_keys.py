"""Keys to file paths: readable for ordinary keys, reversible, and never outside the output."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.keys import MAX_SEGMENT_BYTES, alternative_path, fold, is_safe_join, key_to_path, path_to_key


@pytest.mark.parametrize("key, path", [
    ("photos/cat.jpg", "photos/cat.jpg.png"),
    ("a.png", "a.png.png"),
    ("dir/sub dir/é ü.jpg", "dir/sub dir/é ü.jpg.png"),
    ("../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd.png"),
    ("/etc/passwd", "%/etc/passwd.png"),
    ("a//b", "a/%/b.png"),
    ("a/./b", "a/%2E/b.png"),
    ("..", "%2E%2E.png"),
    ("C:\\Windows\\x", "C%3A%5CWindows%5Cx.png"),
    ("line\nbreak\x00nul", "line%0Abreak%00nul.png"),
    ("100%", "100%25.png"),
    ("", "%.png"),
    ("foo.png/bar", "foo.pn%67/bar.png"),  # never the folder of the file of key "foo"
    ("x.PNG/y.Png/z.png", "x.PN%47/y.Pn%67/z.png.png"),
    ("a.pn%67/b", "a.pn%2567/b.png"),
])
def test_paths(key, path):
    assert key_to_path(key) == path
    assert path_to_key(path) == key


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_any_key_maps_inside_the_output_and_back(key):
    path = key_to_path(key)
    assert is_safe_join("/out/restored", path)
    assert not posixpath.isabs(path) and ".." not in path.split("/") and "\\" not in path
    assert all(segment not in ("", ".") for segment in path.split("/"))
    assert not any(ord(c) < 32 or ord(c) == 127 for c in path)
    if "~" not in path:  # a bare '~' only marks a shortened segment, which is not reversible
        assert path_to_key(path) == key


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab./%\\\n", max_size=6), min_size=2, max_size=2, unique=True))
def test_distinct_keys_get_distinct_paths(pair):
    assert key_to_path(pair[0]) != key_to_path(pair[1])


def test_long_segments_are_shortened_with_a_hash():
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    path_a, path_b = key_to_path(long_a), key_to_path(long_b)
    assert path_a != path_b
    assert len(path_a.encode()) <= MAX_SEGMENT_BYTES + len(".png")


def test_is_safe_join():
    assert is_safe_join("s3-bucket/out", "a/b.png")
    assert not is_safe_join("s3-bucket/out", "../b.png")
    assert not is_safe_join("s3-bucket/out", "/etc/passwd")
    assert not is_safe_join("s3-bucket/out", "a/../../b.png")


def test_no_key_can_spell_another_keys_shortened_name():
    """A short key written as a long key's shortened path (its head, the marker, its hash)
    must not be given that path: the marker is escaped in keys, so only shortening writes it."""
    victim = "photos/" + "y" * 300 + ".jpg"
    forged = key_to_path(victim)[: -len(".png")]
    assert len(forged.split("/")[-1].encode()) <= MAX_SEGMENT_BYTES  # short enough not to be shortened itself
    assert key_to_path(forged) != key_to_path(victim)
    assert key_to_path("a~b") == "a%7Eb.png" and path_to_key("a%7Eb.png") == "a~b"


def test_shortened_names_carry_the_whole_sha256_of_the_segment():
    import hashlib

    segment = "z" * 300
    assert key_to_path(segment).endswith("~" + hashlib.sha256(segment.encode()).hexdigest() + ".png")


_FOLDING = "aA.pngPNG/%~\u00e9e\u0301\u00c9"  # case and NFC/NFD pairs, the suffix, separators


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet=_FOLDING, max_size=8), min_size=2, max_size=2, unique=True))
def test_no_keys_file_is_another_keys_folder_even_folded(pair):
    """``foo`` -> ``foo.png`` and ``foo.png/bar`` must not need ``foo.png`` as a file and a
    folder; nor may any case or normalisation variant of it (macOS, Windows)."""
    a, b = (fold(key_to_path(k)) for k in pair)
    assert not b.startswith(a + "/") and not a.startswith(b + "/")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=_FOLDING, max_size=8), min_size=2, max_size=2, unique=True))
def test_alternative_paths_fold_onto_no_other_name(pair):
    a, b = pair
    names = [fold(key_to_path(a)), fold(key_to_path(b)), fold(alternative_path(a)), fold(alternative_path(b))]
    assert len(set(names[1:])) == 3 and len(set(names[:1] + names[2:])) == 3
    assert posixpath.dirname(alternative_path(a)) == posixpath.dirname(key_to_path(a))


def test_keys_that_differ_in_case_or_normalisation_fold_together():
    assert fold(key_to_path("A.jpg")) == fold(key_to_path("a.jpg"))
    assert fold(key_to_path("caf\u00e9")) == fold(key_to_path("cafe\u0301"))
    assert fold(alternative_path("A.jpg")) != fold(alternative_path("a.jpg"))


def test_an_alternative_name_fits_a_file_name_even_for_a_shortened_segment():
    path = alternative_path("d/" + "\u00e9" * 300)
    assert len(path.split("/")[-1].encode()) <= 255 and path.startswith("d/") and path.endswith(".png")
