"""Images of different shapes in one Arrow column: how stages pass pixels to each other.

Ray Data moves batches between stages as Arrow tables; decoded images (a compress job's
inputs, an audit's originals, restored records) differ in shape from row to row, so they
travel as Ray's variable-shaped tensor type. A row without an image (an error row, a
record that did not restore) holds :data:`EMPTY_PIXELS`, so every row has a value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowVariableShapedTensorArray

EMPTY_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)  # stands for "no image" in a ragged pixel column


def ragged_column(images: list[np.ndarray]) -> pa.ExtensionArray:
    """``images`` (H x W x 3 uint8, any shapes) as one Arrow column; :data:`EMPTY_PIXELS`
    for a row without an image."""
    ragged = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):  # element-wise: equal shapes must not become one 4-D array
        ragged[i] = image
    return ArrowVariableShapedTensorArray.from_numpy(ragged)
