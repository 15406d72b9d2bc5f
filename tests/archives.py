"""Inputs shared by the pipeline tests: a tiny model that no job can find but through the
archives written with it, and a photo folder with the bad inputs a real collection has."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "photos"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random model's weights file. It is not bundled with the package: the restore
    and audit jobs find it in the ``_models/`` of the archives the compress job wrote."""
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu").save_pretrained(path)
    return path


def photo_folder(root: Path, broken: bool = True) -> dict[str, str | None]:
    """Real photos plus, optionally, bad inputs; returns key -> expected error prefix (None = ok)."""
    expected: dict[str, str | None] = {}
    for photo in sorted(EXAMPLES.glob("*.jpg")):
        (root / "photos").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / "photos" / photo.name)
        expected[f"photos/{photo.name}"] = None
    if broken:
        (root / "bad").mkdir(parents=True, exist_ok=True)
        data = (EXAMPLES / "life.jpg").read_bytes()
        (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (root / "bad" / "not-an-image.jpg").write_bytes(b"just some text, certainly not an image " * 10)
        (root / "bad" / "empty.png").write_bytes(b"")
        Image.new("RGB", (700, 500), (10, 20, 30)).save(root / "bad" / "too-large.png")
        (root / "notes.txt").write_text("not an image extension: not an input")
        expected |= {
            "bad/truncated.jpg": "corrupt or truncated image",
            "bad/not-an-image.jpg": "not a recognised image format",
            "bad/empty.png": "empty file",
            "bad/too-large.png": "image too large",
        }
    return expected


def damage_a_page(path: Path, column: str = "key", row_group: int = 0) -> None:
    """Flip one byte inside a page of ``column`` (in ``row_group``) of a Parquet file, choosing a
    byte whose flip a reader that skips page checksums does not notice: the file still
    reads, with different values. Only page checksums can tell."""
    data = path.read_bytes()
    chunk = next(c for c in (pq.read_metadata(path).row_group(row_group).column(i)
                             for i in range(pq.read_metadata(path).num_columns)) if c.path_in_schema == column)
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
    original = pq.read_table(pa.BufferReader(data), columns=[column])
    for position in reversed(range(start, start + chunk.total_compressed_size)):  # a page's data, not its header
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        try:
            silent = not pq.read_table(pa.BufferReader(bytes(damaged)), columns=[column]).equals(original)
        except Exception:  # noqa: BLE001 - a flip the decompressor catches anyway: try the next byte
            continue
        if silent and _checksum_fails(bytes(damaged), column):  # in a page's data (a header is not checksummed)
            path.write_bytes(bytes(damaged))
            return
    raise AssertionError(f"no byte of {column}'s pages in {path} changes its values silently")


def _checksum_fails(data: bytes, column: str) -> bool:
    try:
        pq.read_table(pa.BufferReader(data), columns=[column], page_checksum_verification=True)
    except OSError as error:
        return "checksum" in str(error).lower()
    except Exception:  # noqa: BLE001 - failed otherwise: not the flip this helper is for
        return False
    return False


def write_tar_shard(path: Path, members: dict[str, bytes]) -> None:
    """A tar shard at ``path`` (folders made) holding ``members`` (name -> bytes)."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
