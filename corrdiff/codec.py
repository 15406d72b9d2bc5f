"""CorrDiffCodec: the public API, images (uint8 arrays) <-> self-describing byte records.

    codec = CorrDiffCodec.from_pretrained()            # or a name, or a path
    records = codec.encode([image])                    # list[bytes]
    images = codec.decode(records, mode="corrdiff")    # list[np.ndarray], HxWx3 uint8

Images of any size are replicate-padded to a multiple of 64 and cropped back. The encoder
runs the whole sampler (it fits and quantizes a gamma at every step) and so knows the
exact pixels every decoder of its records will produce on the same platform.

Records are written in format version 3: the networks run on tiles (``Tiling``: 512 px
overlapping by 64 by default; corrdiff.tiling, corrdiff.tiled_sampler), so an image's
memory is its tile's plus 36 bytes per pixel of sampler state, and an image within one
tile is coded exactly as a whole. Version 2 records (the same tiles, one per network call)
and version 1 records (whole-image networks) decode as they were written, to the same
pixels as ever.

The networks see one image at a time, never a batch of images: BLAS and convolution
kernels pick different blockings for different batch sizes, which changes float rounding,
so an image's pixels would depend on which images it happened to be batched with. Within
an image, the score network runs the record's batch of tiles per call (``Tiling.batch``,
stored in the record, so every decoder makes the same calls). A record's pixels depend
only on the record, the model and the platform. Throughput on a GPU comes from several
codec workers per device (the pipeline's actor pools) and from batches of tiles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from corrdiff import weights
from corrdiff.config import ModelConfig
from corrdiff.gamma import GammaFitter
from corrdiff.latent_codec import LatentBitstreams, PixelSource, TiledBitstreams, pad_amount
from corrdiff.model import CorrDiffModel
from corrdiff.record import ModelMismatchError, Record, RecordError, check_padded_size
from corrdiff.sampler import GammaRule, corrected_ddim, initial_state
from corrdiff.tiled_sampler import (
    TiledDenoiser, closed_form_fit, corrected_ddim_tiled, initial_state_tiled, reconstruct_e2e_tiled, to_image,
)
from corrdiff.tiling import Tiling

DecodeMode = Literal["corrdiff", "e2e", "diffusion"]
DECODE_MODES: tuple[str, ...] = ("corrdiff", "e2e", "diffusion")


def pick_device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA when there is one and the CPU otherwise."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_decode_mode(mode: str) -> None:
    """Raise ``ValueError`` naming the valid modes; jobs call it before any work starts."""
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}")


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image: its record, the exact image a corrdiff decode will return, and the
    latent y_hat that the record codes (what :meth:`CorrDiffCodec.verify` checks the record
    against)."""

    record: bytes
    reconstruction: np.ndarray
    gammas: tuple[float, ...]
    seed: int
    latent: Tensor

    @property
    def bpp(self) -> float:
        """Bits per pixel of the whole record (header and checksum included)."""
        height, width = self.reconstruction.shape[:2]
        return 8 * len(self.record) / (height * width)


class CorrDiffCodec:
    def __init__(self, model: CorrDiffModel, device: str | torch.device | None = None,
                 gamma_fitter: GammaFitter | None = None, tiling: Tiling | None = None) -> None:
        self.device = pick_device(device)
        if self.device.type == "cuda":
            # Same record, same GPU type, same pixels: no autotuned or TF32 kernels.
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = model.eval().to(self.device)
        self.model_id: bytes = weights.model_id(model)
        self.gamma_fitter = gamma_fitter or GammaFitter()
        self.tiling = tiling or Tiling()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] | None = None,
                        device: str | torch.device | None = None) -> CorrDiffCodec:
        """Load a shipped model by name (default: ``weights.DEFAULT_MODEL``) or a weights file."""
        return cls(weights.load_model(weights.resolve(name_or_path)), device=device)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0,
                    device: str | torch.device | None = None) -> CorrDiffCodec:
        """A randomly initialised, frozen model: for tests and as the start of training."""
        torch.manual_seed(seed)
        model = CorrDiffModel(config)
        model.latent.freeze()
        return cls(model, device=device)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        weights.save_model(self.model, path)

    @property
    def model_id_hex(self) -> str:
        return self.model_id.hex()

    @property
    def default_steps(self) -> int:
        return self.model.config.diffusion.steps

    # ----------------------------------------------------------------- encode
    def encode(self, images: Sequence[np.ndarray], seed: int = 0, steps: int | None = None) -> list[bytes]:
        """Compress HxWx3 uint8 images into records (one per image, in order).

        ``seed`` seeds x_T (stored in the record); ``steps`` defaults to the model's.
        """
        return [e.record for e in self.encode_detailed(images, seed=seed, steps=steps)]

    @torch.no_grad()
    def encode_detailed(self, images: Sequence[np.ndarray], seed: int = 0,
                        steps: int | None = None) -> list[EncodedImage]:
        """Like :meth:`encode`, also returning each image's exact corrdiff reconstruction."""
        checked = [_check_image(image, i) for i, image in enumerate(images)]
        return [self._encode_one(image, seed, steps or self.default_steps) for image in checked]

    def _encode_one(self, image: np.ndarray, seed: int, steps: int) -> EncodedImage:
        model, tiling = self.model, self.tiling
        height, width = image.shape[:2]
        padded_size = (height + pad_amount(height), width + pad_amount(width))
        pixels = pixel_source(image, self.device)
        streams, y_hat = model.latent.compress_tiled(pixels, padded_size, tiling.tile, self.device)
        x_e = reconstruct_e2e_tiled(model, y_hat, tiling.tile)
        x_start = initial_state_tiled(x_e, seed, model.schedule.alpha_bar(model.schedule.t_max))
        denoiser = TiledDenoiser(model, x_e, y_hat, tiling, spread=True)  # format 3
        fit = self._fit(pixels, padded_size, height, width, x_e)
        out, gammas = corrected_ddim_tiled(denoiser, x_start, model, steps, fit)
        record = Record(
            model_id=self.model_id, height=height, width=width,
            pad_bottom=padded_size[0] - height, pad_right=padded_size[1] - width, seed=seed,
            gammas=tuple(float(g) for g in gammas[0].cpu()), z_string=streams.z, y_strings=tuple(streams.y),
            tile=tiling.tile, overlap=tiling.overlap, tile_batch=tiling.batch,
        )
        return EncodedImage(record.to_bytes(), to_image(out, height, width), record.gammas, seed, y_hat)

    def _fit(self, pixels: PixelSource, padded_size: tuple[int, int], height: int, width: int,
             x_e: Tensor) -> GammaRule:
        """The encoder's gamma rule: the closed form, summed stripe by stripe; a perceptual
        fit needs the whole original as a tensor (its metric sees the whole image), so that
        mode costs 12 more bytes per pixel (docs/method.md, "Tiles")."""
        if not self.gamma_fitter.refines:
            return closed_form_fit(pixels, height, width, x_e)
        target = pixels(0, 0, *padded_size) * 2.0 - 1.0
        mask = torch.zeros_like(target[:, :1])
        mask[..., :height, :width] = 1.0  # gamma is fitted on the image's own pixels, not its padding
        fit_original = self.gamma_fitter.bind(target, mask)
        return lambda step, x0_theta: fit_original(x0_theta, x_e)

    @torch.no_grad()
    def verify(self, encoded: EncodedImage, record: bytes) -> None:
        """Check that ``record`` (the bytes about to be stored) decodes to what the encoder
        coded: it parses (checksum, fields, this model), describes the encoded image, and its
        entropy-coded strings decode to exactly the latent y_hat of ``encoded``. Raises
        ``RecordError`` saying what differs.

        The latent decides every pixel the decoder produces (the sampler is a deterministic
        function of it, the seed and the gammas, all checked here), so a record that passes
        decodes to ``encoded.reconstruction``; checking it costs one entropy decode and no
        network pass of the sampler. It catches a record damaged between the coder and the
        archive and an entropy coder that does not invert itself on this platform.
        """
        parsed = self.parse(record)
        height, width = encoded.reconstruction.shape[:2]
        if (parsed.height, parsed.width) != (height, width):
            raise RecordError(f"record describes a {parsed.width}x{parsed.height} image, the encoder coded "
                              f"{width}x{height}")
        if parsed.gammas != encoded.gammas or parsed.seed != encoded.seed:
            raise RecordError("record's gammas or seed differ from the encoder's")
        latent = self.latent(parsed).to(encoded.latent.device)
        if latent.shape != encoded.latent.shape or not torch.equal(latent, encoded.latent):
            differing = int((latent != encoded.latent).sum()) if latent.shape == encoded.latent.shape else latent.numel()
            raise RecordError(f"record's latent decodes differently from what the encoder coded "
                              f"({differing} of {encoded.latent.numel()} values differ)")

    # ----------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, records: Sequence[bytes], mode: DecodeMode = "corrdiff",
               steps: int | None = None) -> list[np.ndarray]:
        """Reconstruct images from records.

        ``mode``: "corrdiff" (the transmitted gammas; the step count is the record's),
        "e2e" (D alone: lowest distortion, fastest) or "diffusion" (gamma = 0, ``steps``
        free, default the model's). Raises ``RecordError`` for a corrupt record and
        ``ModelMismatchError`` for a record written by another model.
        """
        check_decode_mode(mode)
        parsed = [self.parse(record) for record in records]
        if mode == "corrdiff" and steps is not None and any(r.steps != steps for r in parsed):
            raise ValueError("corrdiff decoding uses the record's own step count; leave steps=None")
        return [self._decode_one(record, mode, steps or self.default_steps) for record in parsed]

    def parse(self, data: bytes) -> Record:
        """Parse and verify a record, and check that this codec's model wrote it."""
        record = Record.from_bytes(data)
        if record.model_id != self.model_id:
            raise ModelMismatchError(record.model_id.hex(), self.model_id_hex)
        return record

    def _decode_one(self, record: Record, mode: DecodeMode, steps: int) -> np.ndarray:
        if record.version == 1:
            return self._decode_whole(record, mode, steps)
        model = self.model
        y_hat = self.latent(record)
        x_e = reconstruct_e2e_tiled(model, y_hat, record.tile)
        if mode == "e2e":
            return to_image(x_e, record.height, record.width)
        x_start = initial_state_tiled(x_e, record.seed, model.schedule.alpha_bar(model.schedule.t_max))
        denoiser = TiledDenoiser(model, x_e, y_hat, record.tiling, spread=record.version >= 3)
        rule, steps = self._decode_rule(record, mode, steps)
        out, _ = corrected_ddim_tiled(denoiser, x_start, model, steps, rule)
        return to_image(out, record.height, record.width)

    def latent(self, record: Record) -> Tensor:
        """y_hat as the record codes it: block by block (versions 2 and 3) or whole (version 1)."""
        if record.version == 1:
            [y_string] = record.y_strings
            streams = LatentBitstreams(z=record.z_string, y=y_string)
            return self.model.latent.decompress([streams], record.padded_size).to(self.device)
        streams = TiledBitstreams(z=record.z_string, y=list(record.y_strings))
        return self.model.latent.decompress_tiled(streams, record.padded_size, record.tile, self.device)

    def _decode_rule(self, record: Record, mode: DecodeMode, steps: int) -> tuple[GammaRule, int]:
        """corrdiff: the record's gammas and step count; diffusion: gamma = 0, any steps."""
        if mode == "corrdiff":
            table = torch.tensor([record.gammas], dtype=torch.float32, device=self.device)
            return (lambda step, x0_theta: table[:, step]), record.steps
        return (lambda step, x0_theta: torch.zeros(1, device=self.device)), steps

    def _decode_whole(self, record: Record, mode: DecodeMode, steps: int) -> np.ndarray:
        """Format version 1: every network on the whole image, as those records were written."""
        model = self.model
        y_hat = self.latent(record)
        x_e = model.reconstruct_e2e(y_hat)
        if mode == "e2e":
            out = x_e
        else:
            x_start = initial_state(x_e, self._noise(x_e.shape, record.seed), model.schedule)
            denoise = lambda x_t, t: model.denoise(x_t, t, x_e, y_hat)  # noqa: E731
            rule, steps = self._decode_rule(record, mode, steps)
            out, _ = corrected_ddim(denoise, x_e, x_start, model.schedule, steps, rule)
        return tensor_to_image(out)[:record.height, :record.width]

    def _noise(self, shape: torch.Size | tuple[int, ...], seed: int) -> Tensor:
        """x_T noise from a seeded CPU generator: identical on every device."""
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(self.device)


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {index}: expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {index}: empty image {image.shape}")
    height, width = image.shape[:2]
    check_padded_size(height + pad_amount(height), width + pad_amount(width))  # before any model runs
    return image


def pixel_source(image: np.ndarray, device: torch.device) -> PixelSource:
    """Crops of the image replicate-padded at the bottom and right, as (1, 3, h, w) tensors in
    [0, 1] on ``device``: the padded image is never materialised (tiled coding)."""
    height, width = image.shape[:2]

    def crop(top: int, left: int, rows: int, cols: int) -> Tensor:
        ys = np.minimum(np.arange(top, top + rows), height - 1)
        xs = np.minimum(np.arange(left, left + cols), width - 1)
        return image_to_tensor(image[ys[:, None], xs[None, :]])[None].to(device)

    return crop


def image_to_tensor(image: np.ndarray) -> Tensor:
    return torch.tensor(image).permute(2, 0, 1).float() / 255.0  # a copy: inputs may be read-only


def tensor_to_image(x: Tensor) -> np.ndarray:
    """[-1, 1] (1, 3, H, W) -> (H, W, 3) uint8, rounded to nearest."""
    scaled = ((x[0].float() + 1.0) * 127.5).clamp(0.0, 255.0).round()
    return scaled.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
