"""CorrDiff: diffusion-based perceptual image compression corrected by a privileged
end-to-end decoder (Ma, Yang, Liu, ICML 2024), as a self-contained PyTorch codec.

This package knows nothing of Ray or storage: it turns images into records and back.
"""

import warnings

with warnings.catch_warnings():
    # compressai scripts a few helpers with torch.jit.script when it is imported, which this
    # torch deprecates. Harmless, not ours to fix, and printed by every Ray worker that
    # imports the codec: silenced here, at its one source, and nowhere else.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    import compressai  # noqa: F401

from corrdiff.codec import DECODE_MODES, CorrDiffCodec, EncodedImage, check_decode_mode
from corrdiff.config import ModelConfig, tiny_config
from corrdiff.library import BundledModels, ModelLibrary, ModelNotFoundError, WeightsSource
from corrdiff.record import ModelMismatchError, RecordError
from corrdiff.weights import WeightsError

__all__ = [
    "DECODE_MODES",
    "BundledModels",
    "CorrDiffCodec",
    "EncodedImage",
    "ModelConfig",
    "ModelLibrary",
    "ModelMismatchError",
    "ModelNotFoundError",
    "RecordError",
    "WeightsError",
    "WeightsSource",
    "check_decode_mode",
    "tiny_config",
]
