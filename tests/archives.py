"""Inputs shared by the pipeline tests: a tiny model that no job can find but through the
archives written with it, and a photo folder with the bad inputs a real collection has."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "photos"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random model's weights file. It is not bundled with the package: the decode
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
