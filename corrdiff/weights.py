"""Saving, loading and identifying model weights.

Weights live in safetensors files (no pickle: loading an untrusted file cannot run code),
with the model config in the file's metadata. The model id is the SHA-256 of the config
and of every tensor (name, dtype, shape, bytes) in name order, truncated to 16 bytes: it
changes with any weight, CDF table or setting that could change a decoded pixel, and it
does not depend on how the file was serialised.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from corrdiff.config import ModelConfig
from corrdiff.model import CorrDiffModel
from corrdiff.record import MODEL_ID_BYTES

WEIGHTS_FORMAT = "corrdiff-weights/1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_MODEL = "corrdiff-photo-0.3-r9"
MODELS_PATH_ENV = "CORRDIFF_MODELS"  # extra directories (os.pathsep-separated) with <name>.safetensors

# Buffers whose shape is only known after LatentCodec.freeze() (compressai's CDF tables).
_RESIZABLE_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def model_id(model: CorrDiffModel) -> bytes:
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:MODEL_ID_BYTES]


def save_model(model: CorrDiffModel, path: str | Path) -> None:
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": model.config.to_json(), "model_id": model_id(model).hex()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_model(path: str | Path) -> CorrDiffModel:
    """Build the model from a weights file; fail loudly if the file is not what it claims."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a CorrDiff weights file (format {metadata.get('format')!r})")
    model = CorrDiffModel(ModelConfig.from_json(metadata["config"]))
    load_state(model, load_file(str(path)))
    actual = model_id(model).hex()
    if actual != metadata.get("model_id"):
        raise ValueError(f"{path} is corrupt: its tensors hash to {actual}, the file says {metadata.get('model_id')}")
    return model


def declared_model_id(path: str | Path) -> str:
    """The model id a weights file declares in its header (hex), without loading its tensors.

    Cheap enough to scan every available model; ``load_model`` then verifies the claim.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != WEIGHTS_FORMAT or "model_id" not in metadata:
        raise ValueError(f"{path} is not a CorrDiff weights file (format {metadata.get('format')!r})")
    return metadata["model_id"]


def find_model(model_id_hex: str) -> Path:
    """The available weights file (shipped or under $CORRDIFF_MODELS) whose model id this is.

    Records name their model by id, not by name, so a decoder years later finds the exact
    weights an archive was written with, whatever the file is called now.
    """
    for path in _model_files():
        if declared_model_id(path) == model_id_hex:
            return path
    raise FileNotFoundError(
        f"no available model has id {model_id_hex}: put its weights file in a directory listed in "
        f"${MODELS_PATH_ENV} (available: {', '.join(available_models()) or 'none'})"
    )


def resolve(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A path to a weights file, or the name of a shipped model (or one under $CORRDIFF_MODELS)."""
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if Path(name).is_file():
        return Path(name)
    extra = [Path(p) for p in os.environ.get(MODELS_PATH_ENV, "").split(os.pathsep) if p]
    for directory in [*extra, PRETRAINED_DIR]:
        candidate = directory / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no model file or model named {name!r}; available models: {', '.join(available_models()) or 'none'}"
    )


def available_models() -> list[str]:
    return sorted({p.stem for p in _model_files()})


def _model_files() -> list[Path]:
    """Weights files in $CORRDIFF_MODELS directories (first) and the shipped ones."""
    extra = [Path(p) for p in os.environ.get(MODELS_PATH_ENV, "").split(os.pathsep) if p]
    return [p for d in [*extra, PRETRAINED_DIR] if d.is_dir() for p in sorted(d.glob("*.safetensors"))]


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
