"""Saving, loading, identifying and checking model weights.

Weights live in safetensors files (no pickle: loading an untrusted file cannot run code),
with the model config in the file's metadata. The model id is the SHA-256 of the config
and of every tensor (name, dtype, shape, bytes) in name order, truncated to 16 bytes: it
changes with any weight, CDF table or setting that could change a decoded pixel, and it
does not depend on how the file was serialised.

A weights file is untrusted input: it may come from an archive's ``_models/`` folder or a
shared store years after it was written. :func:`model_from_bytes` bounds it before use
(file and header size, and a config whose tensors the file cannot hold is refused before
anything is allocated), and recomputes its id: a file that is not exactly the model it
claims to be, or not the model asked for, raises :class:`WeightsError` and is never used.

The package bundles only the models it recommends for new archives (``pretrained/``);
finding any model by id, wherever it is kept, is :mod:`corrdiff.library`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from corrdiff.config import ModelConfig
from corrdiff.model import CorrDiffModel
from corrdiff.record import MODEL_ID_BYTES

WEIGHTS_FORMAT = "corrdiff-weights/1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "corrdiff-photo-0.3-r9"
WEIGHTS_SUFFIX = ".safetensors"
# Bounds on untrusted weights files: the shipped models are 12 MB, a large GPU model a few
# hundred; a safetensors header lists tensor names and offsets, a few KB per hundred tensors.
MAX_WEIGHTS_BYTES = 2**30
MAX_HEADER_BYTES = 2**22

# Buffers whose shape is only known after LatentCodec.freeze() (compressai's CDF tables).
_RESIZABLE_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


class WeightsError(ValueError):
    """A weights file that is not a CorrDiff model, or not the model it claims or is asked to be."""


def model_id(model: CorrDiffModel) -> bytes:
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:MODEL_ID_BYTES]


def is_model_id(text: str) -> bool:
    """Whether ``text`` is a model id in its hex form (32 lower-case hex digits)."""
    return len(text) == 2 * MODEL_ID_BYTES and all(c in "0123456789abcdef" for c in text)


def weights_bytes(model: CorrDiffModel) -> bytes:
    """The model as a weights file's bytes (what :func:`save_model` writes)."""
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": model.config.to_json(), "model_id": model_id(model).hex()}
    return save_tensors(tensors, metadata=metadata)


def save_model(model: CorrDiffModel, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(weights_bytes(model))


def check_weights_size(size: int | None, source: str) -> None:
    """Refuse a weights file larger than any model may be; callers check before reading it."""
    if size is None or size > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{source} is {size} bytes, more than a weights file may be ({MAX_WEIGHTS_BYTES:,})")


def read_weights(path: str | Path) -> bytes:
    """A local weights file's bytes, refused before reading if it is larger than any model."""
    check_weights_size(Path(path).stat().st_size, str(path))
    return Path(path).read_bytes()


def load_model(path: str | Path) -> CorrDiffModel:
    """Build the model from a local weights file; fail loudly if the file is not what it claims."""
    return model_from_bytes(read_weights(path), str(path))


def model_from_bytes(data: bytes, source: str, expected_id: str | None = None) -> CorrDiffModel:
    """Build and verify the model a weights file holds.

    ``source`` names the file in errors. Raises :class:`WeightsError` if the bytes are not a
    CorrDiff weights file within the bounds, if its tensors do not hash to the id it
    declares, or if ``expected_id`` is given and the model is another one.
    """
    metadata = _metadata(data, source)
    try:
        config = ModelConfig.from_json(metadata["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise WeightsError(f"{source} has an invalid model config: {error}") from error
    _check_room(config, len(data), source)
    model = CorrDiffModel(config)
    try:
        load_state(model, load_tensors(data))
    except (SafetensorError, RuntimeError, ValueError, KeyError) as error:
        raise WeightsError(f"{source} does not hold the tensors its config needs: {error}") from error
    actual = model_id(model).hex()
    if actual != metadata["model_id"]:
        raise WeightsError(f"{source} is corrupt: its tensors hash to model {actual}, "
                           f"the file says {metadata['model_id']}")
    if expected_id is not None and actual != expected_id:
        raise WeightsError(f"{source} holds model {actual}, not model {expected_id}")
    return model


def declared_model_id(path: str | Path) -> str:
    """The model id a local weights file declares in its header (hex), without reading its tensors.

    Cheap enough to scan every bundled model; :func:`model_from_bytes` then verifies the claim.
    """
    with open(path, "rb") as handle:
        return header_metadata(handle, str(path))["model_id"]


def header_metadata(handle: BinaryIO, source: str) -> dict[str, str]:
    """The CorrDiff metadata (model id, config) of the weights file open as ``handle``, read
    from its header alone (at most :data:`MAX_HEADER_BYTES`), checked but unverified: what
    the file claims, for sizing workers or finding a model; loading it proves it."""
    head = handle.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    header = handle.read(min(length, MAX_HEADER_BYTES))
    return _metadata(head + header, source, tensors_follow=False)


def _metadata(data: bytes, source: str, tensors_follow: bool = True) -> dict[str, str]:
    """The CorrDiff metadata of a safetensors file's header, checked and bounded."""
    if tensors_follow:
        check_weights_size(len(data), source)
    if len(data) < 8:
        raise WeightsError(f"{source} is not a CorrDiff weights file ({len(data)} bytes)")
    length = struct.unpack("<Q", data[:8])[0]
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise WeightsError(f"{source} is not a CorrDiff weights file (header of {length:,} bytes)")
    try:
        header = json.loads(data[8:8 + length])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as error:
        raise WeightsError(f"{source} is not a CorrDiff weights file (unreadable header)") from error
    if (metadata.get("format") != WEIGHTS_FORMAT or not isinstance(metadata.get("config"), str)
            or not is_model_id(str(metadata.get("model_id")))):
        raise WeightsError(f"{source} is not a CorrDiff weights file (format {metadata.get('format')!r})")
    return metadata


def _check_room(config: ModelConfig, size: int, source: str) -> None:
    """Refuse a config whose tensors could not fit in the file, before allocating any of them.

    The model is built with fake tensors (shapes, no storage; torch's FakeTensorMode, which
    torch.compile is built on: the meta device alone fails on compressai's GDN, whose
    constructor mixes in a CPU tensor). A forged config asking for a network of terabytes is
    then a clear error in a fraction of a second, not an out-of-memory kill.
    """
    try:
        with FakeTensorMode():
            skeleton = CorrDiffModel(config)
    except Exception as error:  # noqa: BLE001 - any config the networks reject is invalid input
        raise WeightsError(f"{source} has an invalid model config: {type(error).__name__}: {error}") from error
    needed = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    if needed > size:
        raise WeightsError(f"{source} is {size:,} bytes, but its config needs {needed:,} bytes of tensors")


def resolve(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A path to a weights file, or the name of a bundled model (None: the default)."""
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if Path(name).is_file():
        return Path(name)
    candidate = PRETRAINED_DIR / f"{name}{WEIGHTS_SUFFIX}"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"no model file or bundled model named {name!r}; bundled models: {', '.join(available_models()) or 'none'}"
    )


def available_models() -> list[str]:
    """The names of the bundled models."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob(f"*{WEIGHTS_SUFFIX}"))


def bundled_model(model_id_hex: str) -> Path | None:
    """The bundled weights file that declares this model id, if the package has one."""
    for path in sorted(PRETRAINED_DIR.glob(f"*{WEIGHTS_SUFFIX}")):
        if declared_model_id(path) == model_id_hex:
            return path
    return None


def load_state(model: CorrDiffModel, state: dict[str, torch.Tensor]) -> None:
    """Load every tensor strictly, the CDF tables included: ``LatentCodec.freeze`` sizes
    them, so a model built from its config may not have their shapes yet."""
    _resize_buffers(model, state)
    model.load_state_dict(state, strict=True)


def _resize_buffers(model: CorrDiffModel, state: dict[str, torch.Tensor]) -> None:
    for name, buffer in list(model.named_buffers()):
        if name.rsplit(".", 1)[-1] in _RESIZABLE_BUFFERS and name in state and buffer.shape != state[name].shape:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(module, name.rsplit(".", 1)[-1], torch.empty_like(state[name]))
