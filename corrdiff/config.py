"""Architecture and sampler settings of a CorrDiff model.

A model's config is part of its identity: it is stored inside the weights file and
hashed into the model id, so a record can only be decoded by the exact network and
sampler that wrote it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from corrdiff.typed_config import ConfigError, parse_config


@dataclass(frozen=True)
class LatentConfig:
    """Channels of the mean-scale hyperprior latent codec (compressai's N and M)."""

    hyper_channels: int = 128  # N: width of the hyper-analysis / hyper-synthesis and z
    latent_channels: int = 192  # M: channels of y
    # Log-uniform table of Gaussian scales the entropy coder has CDFs for
    # (compressai's default range); the hyper-synthesis predicts a position in it.
    scale_min: float = 0.11
    scale_max: float = 256.0
    scale_levels: int = 64


@dataclass(frozen=True)
class ScoreNetConfig:
    """The conditional U-Net f_theta(x_t, t, y_hat) that predicts x0."""

    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4)
    # The U-Net runs on patch_size x patch_size pixel blocks folded into channels
    # (pixel unshuffle), which divides its cost by patch_size^2.
    patch_size: int = 1
    res_blocks: int = 2
    latent_cond_channels: int = 16  # y_hat is projected to this many channels, then upsampled
    time_embed_dim: int = 256
    groups: int = 8  # GroupNorm groups; GroupNorm is per-sample, so results do not depend on batch


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and sampler defaults (see docs/method.md for the choices)."""

    # Shifted cosine schedule: alpha_bar(t) = 1 / (1 + tan^2(pi t / 2) / snr_shift^2).
    # snr_shift > 1 moves every step toward less noise (HFD: the decoder only adds detail).
    snr_shift: float = 2.0
    # Sampling starts at t_max (< 1: from a noised x_e rather than pure noise, as in HFD).
    t_max: float = 0.8
    steps: int = 8


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a CorrDiff network before loading its weights."""

    latent: LatentConfig = field(default_factory=LatentConfig)
    score: ScoreNetConfig = field(default_factory=ScoreNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    decoder_channels: int = 128  # width of the end-to-end decoder D

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): stable input for the model id."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """The config stored in a weights file (``to_json``); missing keys keep their defaults."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"model config is not JSON: {error}") from None
        return parse_config(cls, data, "model config")


def tiny_config() -> ModelConfig:
    """A model small enough to run the whole codec in tests on two CPU cores."""
    return ModelConfig(
        latent=LatentConfig(hyper_channels=8, latent_channels=12),
        score=ScoreNetConfig(
            base_channels=8, channel_mults=(1, 2), res_blocks=1,
            latent_cond_channels=4, time_embed_dim=16, groups=4,
        ),
        diffusion=DiffusionConfig(steps=4),
        decoder_channels=12,
    )
