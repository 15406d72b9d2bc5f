"""Golden records: what a record written by each bundled model decodes to must never change.

An archive is read years after it was written, by whatever version of this code exists
then. For each model the package ships, ``tests/golden/<model>.json`` keeps one small
record of every format version the encoder has written with it, the SHA-256 of the latent
a decoder recovers from each (exact integer arithmetic: identical on every platform) and of
the pixels each decode mode produces on each CPU platform and thread count recorded (float
networks: the same there, not elsewhere). A change that alters what an old record decodes
to fails here; on a platform with no recorded pixels only the latent is checked.

Add what is missing (never rewrite what is there, never to make a failing test pass):
    CORRDIFF_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_records.py
writes a record of the format the encoder writes now, where the file has none of that
version, and this platform's pixels for records that have none here: only from code that
decodes every recorded platform's pixels as they are, and for an old record from the code
that wrote it (or code that decodes it as that did, checked on a platform it recorded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from corrdiff import DECODE_MODES, CorrDiffCodec
from corrdiff.record import FORMAT_VERSION, Record
from corrdiff.tiling import Tiling
from corrdiff.weights import available_models

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
# The version 1 records are 64 x 96 px of sunset.jpg (rows 40-104, columns 60-156). Version
# 2 on: 64 x 160 px (padded to 192 wide) in tiles of 64 px overlapping by 16: three blocks
# and four score tiles, so that the blocks' halos and the blending are pinned too, and
# (version 3) a batch of three score tiles and the one left over.
TILED_CROP = (slice(40, 104), slice(60, 220))
GOLDEN_TILING = Tiling(tile=64, overlap=16, batch=3)


def _platform() -> dict[str, Any]:
    """Where float pixels were decoded; ``threads`` None (the first records): the machine's
    default. ``cpu``: what else picks oneDNN's kernels and their blocking (the CPU's model,
    its L2 cache, its AMX/BF16/VNNI extensions); the first records did not say."""
    return {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads(), "cpu": _cpu()}


def _cpu() -> str:
    cpuinfo, l2 = Path("/proc/cpuinfo"), Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    extensions = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni")))
    return f"{model}; L2 {l2.read_text().strip() if l2.exists() else 'unknown'}; {' '.join(extensions) or '-'}"


def _same_kernels(recorded: dict[str, Any]) -> bool:
    """The recorded platform is this one, in every key it recorded besides the thread count."""
    here = _platform()
    return all(recorded[key] == here[key] for key in ("machine", "cpu_capability", "torch", "cpu") if key in recorded)


def _sha256(array: np.ndarray | torch.Tensor) -> str:
    data = array.detach().cpu().contiguous().numpy() if isinstance(array, torch.Tensor) else np.ascontiguousarray(array)
    return hashlib.sha256(data.tobytes()).hexdigest()


def _decoded(codec: CorrDiffCodec, record: bytes) -> dict[str, str]:
    return {mode: _sha256(codec.decode([record], mode=mode)[0]) for mode in DECODE_MODES}


def _load(name: str) -> dict[str, Any]:
    path = GOLDEN / f"{name}.json"
    assert path.exists(), f"bundled model {name} has no golden record: write one (see this module's docstring)"
    return json.loads(path.read_text())


def _add_missing(name: str, codec: CorrDiffCodec) -> None:
    path = GOLDEN / f"{name}.json"
    golden = json.loads(path.read_text()) if path.exists() else {"model": name, "model_id": codec.model_id_hex,
                                                                  "records": []}
    if all(entry["version"] != FORMAT_VERSION for entry in golden["records"]):
        photo = np.asarray(Image.open(ROOT / "examples" / "photos" / "sunset.jpg").convert("RGB"))[TILED_CROP]
        [encoded] = CorrDiffCodec(codec.model, device="cpu", tiling=GOLDEN_TILING).encode_detailed([photo])
        golden["records"].append({"version": FORMAT_VERSION, "record": base64.b64encode(encoded.record).decode(),
                                  "latent_sha256": _sha256(codec.latent(codec.parse(encoded.record))),
                                  "pixels": []})
    for entry in golden["records"]:
        if not any(_same_kernels(pixels["platform"]) for pixels in entry["pixels"]):
            entry["pixels"].append({"platform": _platform(),
                                    "sha256": _decoded(codec, base64.b64decode(entry["record"]))})
    path.write_text(json.dumps(golden, indent=2) + "\n")


@pytest.mark.parametrize("name", available_models())
def test_a_golden_record_decodes_as_it_always_did(name: str) -> None:
    codec = CorrDiffCodec.from_pretrained(name, device="cpu")
    if os.environ.get("CORRDIFF_WRITE_GOLDEN"):
        _add_missing(name, codec)
    golden = _load(name)
    assert golden["model_id"] == codec.model_id_hex
    checked = 0
    for entry in golden["records"]:
        record = base64.b64decode(entry["record"])
        parsed = Record.from_bytes(record)
        assert (parsed.version, parsed.model_id.hex()) == (entry["version"], codec.model_id_hex)
        assert _sha256(codec.latent(parsed)) == entry["latent_sha256"]  # integer coding: any platform
        threads = torch.get_num_threads()
        for pixels in entry["pixels"]:
            recorded = pixels["platform"]
            if not _same_kernels(recorded):
                continue
            torch.set_num_threads(recorded["threads"] or threads)
            try:
                assert _decoded(codec, record) == pixels["sha256"], f"version {entry['version']} on {recorded}"
            finally:
                torch.set_num_threads(threads)
            checked += 1
    assert {entry["version"] for entry in golden["records"]} >= {FORMAT_VERSION}, "no record of the current format"
    if not checked:
        platforms = [p["platform"] for entry in golden["records"] for p in entry["pixels"]]
        pytest.skip(f"pixels were recorded on {platforms}, this is {_platform()}: float kernels may differ")


def test_every_golden_record_belongs_to_a_bundled_model() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == available_models()
