"""The shipped weights: what the model card says about them is true, and the default works.

An archive names its model by id, and users pick models by the names in docs/models.md, so
the card's table must list every shipped file under its real id, and mark the model that
``CorrDiffCodec.from_pretrained()`` loads when given no name.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec
from corrdiff.weights import DEFAULT_MODEL, PRETRAINED_DIR, available_models, resolve

ROOT = Path(__file__).resolve().parents[1]
MAX_SHIPPED_BYTES = 15 * 2**20  # the limit per checkpoint
# docs/models.md, "Size budget": a GPU call carries the working tree, a training data pack
# and wheels, 64 MiB in all; the tracked files get half.
MAX_TRACKED_BYTES = 32 * 2**20
SHIPPED = sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors"))


def _card_rows() -> dict[str, tuple[str, bool]]:
    """name -> (model id, marked default) from the table of shipped models in docs/models.md."""
    card = (ROOT / "docs" / "models.md").read_text()
    rows = re.findall(r"^\| `([\w.-]+)`( \(default\))? \| `configs/[^|]*\| `([0-9a-f]{32})` \|", card, re.M)
    return {name: (model_id, bool(default)) for name, default, model_id in rows}


def test_shipped_models_are_listed_and_available() -> None:
    assert DEFAULT_MODEL in SHIPPED and len(SHIPPED) >= 2
    assert set(SHIPPED) <= set(available_models())
    assert sorted(_card_rows()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_the_model_card_gives_each_shipped_model_its_real_id(name: str) -> None:
    path = resolve(name)
    assert path.stat().st_size <= MAX_SHIPPED_BYTES
    model_id, marked_default = _card_rows()[name]
    assert CorrDiffCodec.from_pretrained(name, device="cpu").model_id_hex == model_id
    assert marked_default == (name == DEFAULT_MODEL)


def test_the_default_model_round_trips_a_real_photo_in_every_mode() -> None:
    codec = CorrDiffCodec.from_pretrained(device="cpu")
    assert codec.model_id_hex == CorrDiffCodec.from_pretrained(DEFAULT_MODEL, device="cpu").model_id_hex
    photo = np.asarray(Image.open(ROOT / "examples" / "photos" / "sunset.jpg").convert("RGB"))[:96, :160]
    [encoded] = codec.encode_detailed([photo])
    assert 0 < encoded.bpp < 2.0  # bits from the record's bytes; a 0.3 bpp model, on a tiny crop
    for mode in ("corrdiff", "e2e", "diffusion"):
        [decoded] = codec.decode([encoded.record], mode=mode)
        assert decoded.shape == photo.shape and decoded.dtype == np.uint8
    [decoded] = codec.decode([encoded.record])
    assert np.array_equal(decoded, encoded.reconstruction)  # the encoder simulated this decoder exactly


def test_the_tracked_files_fit_the_repository_budget() -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    paths = [ROOT / name.decode() for name in listed.stdout.split(b"\0") if name]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    assert total <= MAX_TRACKED_BYTES, f"tracked files take {total / 2**20:.1f} MiB, the budget is 32 MiB"
