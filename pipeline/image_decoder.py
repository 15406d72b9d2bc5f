"""Image decoding in a child process: bytes that crash the decoder cost one row, not the job.

Pillow and its plugins (libjpeg, libpng, libtiff, libheif, libjxl, openjpeg) are native
code fed untrusted bytes. A file that makes one of them crash (a segmentation fault), or a
decompression bomb that passes the pixel limit and makes the kernel's out-of-memory killer
step in, kills the process that decodes it. In the Ray task that process would be the
task's worker: Ray retries the task (a bounded number of times, pipeline.resources), then
the run fails, and the image never becomes a row. So the CPU stages that decode image bytes
(the compress job's ``DecodeImages``, the audit's ``FetchOriginals``) decode through
:func:`isolated_decoder`: the stage :class:`ImageDecoder` runs in a child process of the task
(pipeline.isolation), one image at a time; an image that kills the child
``resources.worker_attempts`` times becomes the reason ``decode crashed (retryable):
killed by SIGSEGV (a crash in native code) (tried 2 time(s) alone)``, and the other images of
the batch decode in a fresh child.

Why a child per task and not an actor pool of decoders, measured on the 2-CPU test machine:
the child imports numpy, pyarrow, Pillow and its plugins, never Ray or torch, and starts in
0.3 s idle, up to 3.5 s at load average 17 (76 MB resident); a task decodes up to
``resources.task_batch_size`` (16) images, so the start costs 20-200 ms per image of a full
batch, beside 10-20 s per megapixel to encode (the README's example ran as fast as before,
within the shared machine's noise, docs/archive.md). An actor
pool would hold a CPU share for the whole run and, on 2 CPUs beside the encode actor, take
the one the read tasks need (two 1-CPU actors deadlock the pipeline); tasks keep asking for
half a CPU as before, so decoding still overlaps encoding. The child starts only for a
batch that holds something to decode, and stops when the task is done with its batch.

Images go to the child one at a time: the child holds one image's bytes and pixels at most,
and every death is that image's (the first one counts).

Memory cap (``resources.image_worker_memory_gb``; default :func:`decode_memory_cap`): the
task kills its child past the cap, before the node's out-of-memory killer chooses a victim.
What decoding one image takes, measured (peak resident memory over the child's 80-110 MB
after imports, per pixel, 10 Mpx images): 14 B/px for an 8-bit JPEG or CMYK TIFF, 22 for
RGBA PNG with an ICC profile, 28 for 16-bit gray PNG and float TIFF, 32 for a 32-bit
integer TIFF. The default allows 512 MiB plus 48 B/px of ``max_pixels`` (the worst measured,
the file's bytes, and the pixels' copy on their way to the task): 5.0 GiB at the default
100 Mpx, at most 80% of the node's memory. A decoder that wants more than that for an image
the pixel limit let through is a decompression bomb.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.images import ImageDecodeError, decode_image
from pipeline.isolation import IsolatedStage, WorkerLimits, isolated

BASE_MEMORY = 512 * 2**20  # the child's imports (80-110 MB) and the image's file bytes, with room
BYTES_PER_PIXEL = 48  # the worst measured decode (32 B/px) and the pixels' way out (see the module)

DECODED_SCHEMA = pa.schema([("error", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
                            ("pixels", pa.large_binary())])


def decode_memory_cap(max_pixels: int) -> int:
    """The default memory cap of a decoding child, for images of at most ``max_pixels``."""
    return BASE_MEMORY + BYTES_PER_PIXEL * max_pixels


class ImageDecoder:
    """The isolated stage: a batch of image bytes (column ``data``) -> each image's pixels
    (HxWx3 uint8, raw, with its height and width) or the reason it has none."""

    death: ClassVar[str] = "decode crashed"

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._one(data) for data in batch.column("data").to_pylist()]
        return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)

    def _one(self, data: bytes) -> dict[str, Any]:
        try:
            image = decode_image(data, self.max_pixels)
        except ImageDecodeError as error:
            return {"error": str(error)}
        except Exception as error:  # noqa: BLE001 - a decoder bug is this image's reason, not the batch's
            return {"error": f"decode failed: {type(error).__name__}: {error}"}
        return {"height": image.shape[0], "width": image.shape[1], "pixels": image.tobytes()}

    @classmethod
    def lost(cls, batch: pa.Table, reason: str, settings: dict[str, Any]) -> pa.Table:
        """The images whose decoding killed the child (pipeline.isolation): the reason, no pixels."""
        return pa.Table.from_pylist([{"error": reason}] * batch.num_rows, schema=DECODED_SCHEMA)


Decode = Callable[[bytes], "np.ndarray | str"]


@contextmanager
def isolated_decoder(max_pixels: int, limits: WorkerLimits) -> Iterator[Decode]:
    """A function from image bytes to their pixels (HxWx3 uint8) or the reason there are
    none, decoding in a child process that starts at the first image and stops on exit."""
    limits = WorkerLimits(memory_bytes=limits.memory_bytes or min(decode_memory_cap(max_pixels), limits.memory_cap()),
                          attempts=limits.attempts)
    stage: IsolatedStage | None = None

    def decode(data: bytes) -> np.ndarray | str:
        nonlocal stage
        if stage is None:
            stage = isolated(ImageDecoder)({"max_pixels": max_pixels}, limits)
        decoded = stage(pa.table({"data": pa.array([data], pa.large_binary())}))
        error, height, width = (decoded[name][0].as_py() for name in ("error", "height", "width"))
        if error is not None:
            return error
        # A view of the bytes as received (read-only), not a copy: the caller copies them once, into its column.
        return np.frombuffer(decoded["pixels"][0].as_buffer(), dtype=np.uint8).reshape(height, width, 3)

    try:
        yield decode
    finally:
        if stage is not None:
            stage.close()
