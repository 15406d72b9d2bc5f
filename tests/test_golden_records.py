"""Golden records: what a record written by each bundled model decodes to must never change.

An archive is read years after it was written, by whatever version of this code exists
then. For each model the package ships, ``tests/golden/<model>.json`` keeps one small
record it wrote, the SHA-256 of the latent a decoder recovers from it (exact integer
arithmetic: identical on every platform) and of the pixels each decode mode produces
(float networks: the same on the CPU platform recorded beside them, which the tests run
on). A change that alters what an old record decodes to fails here.

Regenerate (only for a new bundled model, never to make a failing test pass):
    CORRDIFF_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_records.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corrdiff import DECODE_MODES, CorrDiffCodec
from corrdiff.latent_codec import LatentBitstreams
from corrdiff.record import Record
from corrdiff.weights import available_models

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
CROP = (slice(40, 104), slice(60, 156))  # 64 x 96 px of a real photo: small, one pad in width


def _platform() -> dict[str, str]:
    return {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__.split("+")[0]}


def _sha256(array: np.ndarray | torch.Tensor) -> str:
    data = array.detach().cpu().contiguous().numpy() if isinstance(array, torch.Tensor) else np.ascontiguousarray(array)
    return hashlib.sha256(data.tobytes()).hexdigest()


def _latent(codec: CorrDiffCodec, record_bytes: bytes) -> torch.Tensor:
    record = Record.from_bytes(record_bytes)
    streams = LatentBitstreams(z=record.z_string, y=record.y_strings[0])
    return codec.model.latent.decompress([streams], record.padded_size)


def _decoded(codec: CorrDiffCodec, record: bytes) -> dict[str, str]:
    return {mode: _sha256(codec.decode([record], mode=mode)[0]) for mode in DECODE_MODES}


def _write(name: str, codec: CorrDiffCodec) -> None:
    photo = np.asarray(Image.open(ROOT / "examples" / "photos" / "sunset.jpg").convert("RGB"))[CROP]
    [encoded] = codec.encode_detailed([photo])
    golden = {"model": name, "model_id": codec.model_id_hex, "record": base64.b64encode(encoded.record).decode(),
              "latent_sha256": _sha256(_latent(codec, encoded.record)),
              "pixels_sha256": _decoded(codec, encoded.record), "platform": _platform()}
    (GOLDEN / f"{name}.json").write_text(json.dumps(golden, indent=2) + "\n")


@pytest.mark.parametrize("name", available_models())
def test_a_golden_record_decodes_as_it_always_did(name: str) -> None:
    codec = CorrDiffCodec.from_pretrained(name, device="cpu")
    if os.environ.get("CORRDIFF_WRITE_GOLDEN"):
        _write(name, codec)
    path = GOLDEN / f"{name}.json"
    assert path.exists(), f"bundled model {name} has no golden record: write one (see this module's docstring)"
    golden = json.loads(path.read_text())
    record = base64.b64decode(golden["record"])
    assert golden["model_id"] == codec.model_id_hex == Record.from_bytes(record).model_id.hex()
    assert _sha256(_latent(codec, record)) == golden["latent_sha256"]  # integer coding: any platform
    if golden["platform"] != _platform():
        pytest.skip(f"pixels were recorded on {golden['platform']}, this is {_platform()}: float kernels may differ")
    assert _decoded(codec, record) == golden["pixels_sha256"]


def test_every_golden_record_belongs_to_a_bundled_model() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == available_models()
