"""What a training run needs besides its losses (corrdiff/training.py), for runs that must
fit a wall clock and a transfer limit, as on a lent GPU (docs/training.md):

- :func:`phase_ends`: a budget of seconds split between phases by fractions;
- :func:`cosine_lr`: a learning rate that anneals over a phase's steps or its time;
- :class:`RandomCrops`: batches of random training crops, cut and resized on the CPU;
- :class:`DeviceCrops`: the same crops, cut and
  resized on the training device from images held there, so that no CPU resampling
  stands between a GPU and its next batch;
- :class:`CheckpointStore`: the resumable state in files of bounded size, each written
  atomically, so that a run killed at any moment leaves a loadable state;
- :func:`export_snapshot`: the exported (frozen) model, written atomically beside it;
- :func:`optional_lpips`: LPIPS-alex, or the reason it cannot be had here.

Nothing here imports Ray, pyarrow or pytorch-msssim: a GPU machine may lack them.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from corrdiff.model import CorrDiffModel
from corrdiff.weights import load_state, save_model

logger = logging.getLogger(__name__)

MIB = 2**20
# Room left in each file of a size-bounded checkpoint for what pickling adds to the tensors.
_PICKLE_MARGIN = 128 * 1024


# ------------------------------------------------------------------------- budget
def phase_ends(start: float, end: float, fractions: Sequence[float]) -> list[float]:
    """The times at which consecutive phases must stop: ``[start, end]`` cut in proportion
    to ``fractions`` (normalised). A phase that finishes its steps early leaves its time to
    the phases after it, since each end is cumulative."""
    if not fractions:
        return []
    if any(f <= 0 for f in fractions):
        raise ValueError(f"phase fractions must be positive, got {list(fractions)}")
    total = float(sum(fractions))
    ends, done = [], 0.0
    for fraction in fractions:
        done += fraction
        ends.append(start + (end - start) * done / total)
    ends[-1] = end
    return ends


def cosine_lr(lr: float, lr_final: float | None, progress: float) -> float:
    """``lr`` annealed to ``lr_final`` along a half cosine as ``progress`` goes 0 -> 1
    (``lr_final`` None: constant)."""
    if lr_final is None:
        return lr
    progress = min(max(progress, 0.0), 1.0)
    return lr_final + (lr - lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------- data
class RandomCrops:
    """Batches of random square crops (with random horizontal flips), images drawn by area.

    With ``min_scale < 1`` each crop is taken at a random scale, log-uniform in
    ``[min_scale, 1]``: a square of ``crop / scale`` pixels is cut and resized down to
    ``crop`` (Lanczos). Camera photos of 2-6k pixels are much smoother per pixel than the
    sub-megapixel images archives hold, so training only at full resolution teaches a
    model the wrong statistics; downscaling restores the detail density of smaller images.
    """

    def __init__(self, images: list[np.ndarray], crop: int, seed: int, min_scale: float = 1.0) -> None:
        if not images:
            raise ValueError("no training images")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.images, self.crop, self.min_scale = images, crop, min_scale
        areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        crops = []
        for index in self.rng.choice(len(self.images), size=size, p=self.weights):
            image = self.images[index]
            crop = self._crop(image, self._side(image))
            crops.append(crop[:, ::-1] if self.rng.random() < 0.5 else crop)
        array = np.ascontiguousarray(np.stack(crops))
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0

    def _side(self, image: np.ndarray) -> int:
        """Side of the square to cut: ``crop / scale``, never larger than the image."""
        if self.min_scale == 1.0:
            return self.crop
        scale = float(np.exp(self.rng.uniform(np.log(self.min_scale), 0.0)))
        return min(round(self.crop / scale), *image.shape[:2])

    def _crop(self, image: np.ndarray, side: int) -> np.ndarray:
        top = self.rng.integers(0, image.shape[0] - side + 1)
        left = self.rng.integers(0, image.shape[1] - side + 1)
        region = image[top:top + side, left:left + side]
        if side == self.crop:
            return region
        return np.asarray(Image.fromarray(region).resize((self.crop, self.crop), Image.Resampling.LANCZOS))


class DeviceCrops:
    """Batches of random square crops cut on ``device`` from images held there (uint8).

    The same draws, in the same order from the same seed, as
    :class:`RandomCrops` (image by area, scale log-uniform in
    ``[min_scale, 1]``, position, horizontal flip), so at ``min_scale = 1`` the batches are
    identical. A scaled crop is resized with antialiased bicubic interpolation on the
    device (``RandomCrops`` uses Pillow's Lanczos on the CPU) and rounded to 8 bits as
    ``RandomCrops`` does. On a GPU this costs a few small kernels per crop and no transfer;
    the images take their decoded size in device memory (1 GB for 330 Mpx).
    """

    def __init__(self, images: list[np.ndarray], crop: int, seed: int, min_scale: float = 1.0,
                 device: str | torch.device = "cpu") -> None:
        if not images:
            raise ValueError("no training images")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.device = torch.device(device)
        self.crop, self.min_scale = crop, min_scale
        # np.require copies only arrays torch cannot share (read-only or strided decoder output).
        self.images = [torch.from_numpy(np.require(im, requirements=["C", "W"])).to(self.device).permute(2, 0, 1)
                       for im in images]
        areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> DeviceCrops:
        """Start a new stream of draws (each phase has its own seed); the images stay put."""
        self.rng = np.random.default_rng(seed)
        return self

    def batch(self, size: int) -> Tensor:
        """(size, 3, crop, crop) float32 in [0, 1] on the device."""
        crops = []
        for index in self.rng.choice(len(self.images), size=size, p=self.weights):
            image = self.images[index]
            side = self._side(image)
            top = int(self.rng.integers(0, image.shape[1] - side + 1))
            left = int(self.rng.integers(0, image.shape[2] - side + 1))
            region = image[:, top:top + side, left:left + side].float()
            if side != self.crop:
                region = F.interpolate(region[None], size=(self.crop, self.crop), mode="bicubic",
                                       antialias=True, align_corners=False)[0].clamp(0.0, 255.0).round()
            crops.append(region.flip(-1) if self.rng.random() < 0.5 else region)
        return torch.stack(crops) / 255.0

    def _side(self, image: Tensor) -> int:
        if self.min_scale == 1.0:
            return self.crop
        scale = float(np.exp(self.rng.uniform(np.log(self.min_scale), 0.0)))
        return min(round(self.crop / scale), image.shape[1], image.shape[2])


# ------------------------------------------------------------------------- checkpoints
class CheckpointStore:
    """The resumable state of a run as ``checkpoint.pt`` plus, where the optimizer's state
    would make that file larger than ``max_file_bytes``, ``checkpoint-optimizer-<i>.pt``
    shards of at most that size.

    Every file is written to a temporary name and renamed, so a kill leaves each file whole.
    The shards are written first and carry a generation id that ``checkpoint.pt`` names: if
    a kill falls between them, :meth:`load` finds shards of another generation and resumes
    with a fresh optimizer (the weights are never mixed). ``max_file_bytes`` None: one file.
    """

    def __init__(self, folder: str | Path, max_file_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "checkpoint.pt"
        self.max_file_bytes = max_file_bytes

    def shard_path(self, index: int) -> Path:
        return self.folder / f"checkpoint-optimizer-{index}.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def check_fits(self, state: dict[str, Any]) -> None:
        """Raise if ``state`` without the optimizer's cannot fit one file."""
        self.check_model_bytes(_nbytes({k: v for k, v in state.items() if k != "optimizer"}))

    def check_model_bytes(self, nbytes: int) -> None:
        """Raise (before any training, given the exported model's size, CDF tables included)
        if a checkpoint of a model this large cannot fit one file."""
        size = nbytes + _PICKLE_MARGIN
        if self.max_file_bytes is not None and size > self.max_file_bytes:
            raise ValueError(f"the model's checkpoint needs about {size / MIB:.2f} MiB, more than the "
                             f"{self.max_file_bytes / MIB:.2f} MiB a file may have here: use a smaller model")

    def save(self, state: dict[str, Any]) -> list[Path]:
        """Write ``state`` (``optimizer`` a torch optimizer state dict, or {}); returns the files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        optimizer = state.get("optimizer") or {}
        whole = _nbytes(state) + _PICKLE_MARGIN
        if self.max_file_bytes is not None and whole > self.max_file_bytes:
            self.check_fits(state)
        if self.max_file_bytes is None or whole <= self.max_file_bytes or not optimizer.get("state"):
            _atomic_save(state, self.path)
            self._remove_shards(0)
            return [self.path]
        generation = uuid.uuid4().hex
        shards = _split(optimizer["state"], self.max_file_bytes - _PICKLE_MARGIN)
        written = []
        for index, shard in enumerate(shards):
            written.append(self.shard_path(index))
            _atomic_save({"generation": generation, "state": shard}, written[-1])
        head = dict(state, optimizer={"param_groups": optimizer["param_groups"], "state": {}},
                    optimizer_generation=generation, optimizer_shards=len(shards))
        _atomic_save(head, self.path)
        self._remove_shards(len(shards))
        return [self.path, *written]

    def load(self, map_location: str | torch.device | None = None) -> dict[str, Any] | None:
        """The saved state with the optimizer's shards merged back, or None if there is none."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location=map_location, weights_only=True)
        shards = state.pop("optimizer_shards", None)
        generation = state.pop("optimizer_generation", None)
        if shards is None:
            return state
        merged: dict[Any, Any] = {}
        for index in range(shards):
            path = self.shard_path(index)
            part = torch.load(path, map_location=map_location, weights_only=True) if path.exists() else None
            if part is None or part.get("generation") != generation:
                logger.warning("%s is missing or from another checkpoint (a kill between writes): "
                               "resuming with a fresh optimizer state", path.name)
                state["optimizer"] = {}
                return state
            merged.update(part["state"])
        state["optimizer"]["state"] = merged
        return state

    def _remove_shards(self, first: int) -> None:
        index = first
        while self.shard_path(index).exists():
            self.shard_path(index).unlink()
            index += 1


def _split(state: dict[Any, dict[str, Any]], limit: int) -> list[dict[Any, dict[str, Any]]]:
    """Per-parameter optimizer state packed greedily, in order, into groups of <= ``limit`` bytes."""
    shards: list[dict[Any, dict[str, Any]]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = _nbytes(value)
        if nbytes > limit:
            raise ValueError(f"one parameter's optimizer state ({nbytes / MIB:.1f} MiB) exceeds the file limit")
        if size + nbytes > limit and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------- export
def export_snapshot(model: CorrDiffModel, path: str | Path) -> Path:
    """Write ``model``'s weights as a loadable model (CDF tables and fixed-point h_s computed
    on a CPU copy; the training model, its device and the RNG streams are left untouched),
    atomically: a reader sees the previous file or the new one, never half of one."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # building a model draws initial weights
        snapshot = CorrDiffModel(model.config)
    load_state(snapshot, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    snapshot.eval()
    snapshot.latent.freeze()
    tmp = path.with_name(path.name + ".tmp")
    save_model(snapshot, tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------- LPIPS
def optional_lpips(device: str | torch.device):
    """(LPIPS-alex on ``device``, "") or (None, why not): the lpips package or its ImageNet
    backbone may be missing (a GPU machine has neither unless they are carried)."""
    try:
        from corrdiff.metrics import LPIPS

        return LPIPS("alex", device=device), ""
    except (ImportError, FileNotFoundError) as error:
        return None, f"{type(error).__name__}: {error}"


def memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated so far (GiB), or None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
