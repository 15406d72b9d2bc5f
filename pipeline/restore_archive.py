"""The restore pipeline: archive -> records (tasks) -> pixels (actor pool) -> PNG files (tasks).

    footers (driver) -> read selected rows (tasks, one per archive file; with keys, only the files
        whose key range can hold one, and of those the records of the row groups that hold one)
        -> RestoreRecords (actors: the models, GPUs where there are any; pipeline/restore.py)
        -> WritePngs (CPU tasks; PNG encoding stays off the GPU actors)
        -> manifest: OUTPUT/_restore/<run>.parquet (key -> file, status) + <run>.json

Every selected key gets a manifest row: restored (with its path), or why not (an error row
of the archive, a corrupt record, a model found nowhere, a failed write, a key that is not in the
archive). Files are written under names from ``pipeline.keys``: never outside the output.

No key's file replaces another key's. Each PNG carries its key (an iTXt chunk
``corrdiff-key``) and is created exclusively; where a file is already there, the key it
holds decides: the same key (a rerun) is overwritten, another key's file (or one with no
key) is left alone and this key goes to its ``alternative_path``, and if that too holds
another key's file the row is ``write_failed``. Before writing, the driver reads the
selected keys once more and gives the alternative path at once to every key but the
first (in code-point order) of each group whose paths fold together (``keys.fold``), so
that one run's files are distinct names on case- and normalisation-insensitive file
systems too, even when the run writes to a case-sensitive one; the manifest row names the
file each key was written to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import posixpath
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image, PngImagePlugin

from corrdiff import check_decode_mode

from pipeline.keys import alternative_path, fold, is_safe_join, key_to_path
from pipeline.models import ModelSources
from pipeline.resources import ResourcePlan, ResourceSettings, StageResources
from pipeline.restore import OK, RestoreRecords
from pipeline.run_ids import new_run_id
from pipeline.selection import (FileSelection, all_rows, archive_files, key_rows, read_selected, split_file_rows,
                                with_read_failures)
from pipeline.stage import TaskStage
from pipeline.storage import StorageConfig, filesystem, with_retries
from pipeline.worker_memory import restore_worker_bytes, sized_plan

NOT_IN_ARCHIVE = "not_in_archive"
WRITE_FAILED = "write_failed"
UNREADABLE_FILE = "unreadable_file"  # a data file that cannot be read, or a requested key that may be in one

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("path", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("model_id", pa.string()), ("codec", pa.string()),
    ("mode", pa.string()),
    ("archive_file", pa.string()), ("archive_row", pa.int64()), ("seconds", pa.float64()),
])


@dataclass(frozen=True)
class RestoreConfig:
    archive: str
    output: str
    keys: tuple[str, ...] | None = None  # None = every key
    mode: str = "corrdiff"
    model: str | None = None  # None = each record's own model, found by its id (pipeline.models)
    # Where to look for models after the archive's _models/ and the package: fsspec prefixes
    # holding <model id>.safetensors.
    model_stores: tuple[str, ...] = ()
    device: str = "auto"
    storage: StorageConfig = field(default_factory=StorageConfig)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    run_id: str | None = None

    def __post_init__(self) -> None:
        check_decode_mode(self.mode)

    @property
    def models(self) -> ModelSources:
        return ModelSources(self.archive, self.storage, self.model_stores)


KEY_CHUNK = b"corrdiff-key"  # the iTXt keyword under which each restored PNG names its key
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class WritePngs(TaskStage):
    """Restored images -> PNG files under ``output``; emits the manifest rows (no pixels).

    ``aside``: keys that go straight to their ``alternative_path`` (:func:`fold_aside`)."""

    name = "WritePngs"
    batch_format = "numpy"

    def __init__(self, output: str, storage: StorageConfig, mode: str, aside: frozenset[str] = frozenset()) -> None:
        self.output, self.storage, self.mode, self.aside = output, storage, mode, aside

    @classmethod
    def resources(cls, plan: ResourcePlan) -> StageResources:
        """A task's CPUs, and the restore stage's batches as they come: its batch size, not
        the tasks' (16 restored 24 Mpx images would be 1.2 GB in one task)."""
        return dataclasses.replace(plan.tasks, batch_size=plan.actor.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        fs, root = filesystem(self.output, self.storage)
        rows = []
        for i, key in enumerate(batch["key"]):
            status, error = batch["status"][i], batch["error"][i]
            pixels = np.asarray(batch["pixels"][i], dtype=np.uint8)
            relative, height, width = None, None, None
            if status == OK:
                height, width = int(pixels.shape[0]), int(pixels.shape[1])
                try:
                    relative = _place(fs, root, key, _png_with_key(pixels, key), self.storage, key in self.aside)
                except Exception as write_error:  # noqa: BLE001 - reported in the manifest
                    status, error = WRITE_FAILED, f"write failed: {type(write_error).__name__}: {write_error}"
            rows.append({"key": key, "path": relative if status == OK else None, "status": status, "error": error,
                         "width": width, "height": height, "model_id": batch["model_id"][i],
                         "codec": batch["codec"][i], "mode": self.mode,
                         "archive_file": batch["archive_file"][i], "archive_row": int(batch["archive_row"][i]),
                         "seconds": float(batch["seconds"][i])})
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _png_with_key(pixels: np.ndarray, key: str) -> bytes:
    """The PNG of ``pixels`` with ``key`` in an uncompressed iTXt chunk before the image data,
    as UTF-8 (a lone surrogate, which a key read from a listing may hold, as its
    surrogatepass bytes: the chunk then is not strict UTF-8, but it is the exact key)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(KEY_CHUNK, key.encode("utf-8", "surrogatepass"))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _place(fs: fsspec.AbstractFileSystem, root: str, key: str, data: bytes, storage: StorageConfig,
           aside: bool) -> str:
    """Write ``data`` for ``key`` without replacing another key's file; return the path used.

    Tried in turn: the key's path (unless ``aside``), then its alternative path. Each is
    created exclusively; if something is there, only a file holding this same key (a rerun)
    is overwritten. Raises ``FileExistsError`` when every name holds another key's file."""
    names = [alternative_path(key)] if aside else [key_to_path(key), alternative_path(key)]
    for relative in names:
        if not is_safe_join(root, relative):
            raise ValueError(f"refusing to write outside {root}: {relative!r}")
        target = posixpath.join(root, relative)
        with_retries(lambda: fs.makedirs(posixpath.dirname(target), exist_ok=True), storage, f"mkdir {target}")
        try:
            with_retries(lambda: _create(fs, target, data), storage, f"write {target}")
            return relative
        except (FileExistsError, IsADirectoryError):
            if _stored_key(fs, target, storage) == key.encode("utf-8", "surrogatepass"):
                with_retries(lambda: fs.pipe_file(target, data), storage, f"rewrite {target}")
                return relative
    raise FileExistsError(f"{' and '.join(names)} hold other keys' files (or files without a key); nothing replaced")


def _create(fs: fsspec.AbstractFileSystem, target: str, data: bytes) -> None:
    """Create ``target`` holding ``data``; ``FileExistsError`` if something is there.

    Local files: ``open(..., "xb")`` (O_EXCL), atomic, also against a name that differs
    only in case or normalisation on a file system that folds names. Elsewhere fsspec's
    ``pipe_file(mode="create")``: for s3fs a conditional PUT (``If-None-Match: *``),
    atomic on AWS S3 and on stores that honour the header; other backends check, then
    write. The check before it makes stores that ignore the header (some S3 gateways)
    check-then-write too: two writers racing for one name in the moment between the check
    and the PUT could still both write there. The write is one PUT, so a reader never sees
    half a file."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        with fs.open(target, "xb") as handle:
            handle.write(data)
        return
    if fs.exists(target):
        raise FileExistsError(target)
    fs.pipe_file(target, data, mode="create")  # s3fs raises FileExistsError for the 412 of an existing object


def _stored_key(fs: fsspec.AbstractFileSystem, target: str, storage: StorageConfig) -> bytes | None:
    """The key bytes in an existing PNG's ``corrdiff-key`` chunk, or None: not a PNG, no
    such chunk before the image data, a folder, gone, or unreadable. Reads the chunk
    headers only up to the first image data, not the whole file."""
    try:
        with with_retries(lambda: fs.open(target, "rb", block_size=1 << 16), storage, f"open {target}") as handle:
            if handle.read(8) != _PNG_SIGNATURE:
                return None
            while True:
                header = handle.read(8)
                if len(header) < 8:
                    return None
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind != b"iTXt" or length > 1 << 24:
                    handle.seek(length + 4, 1)
                    continue
                body = handle.read(length)
                handle.seek(4, 1)  # the CRC
                keyword, _, rest = body.partition(b"\0")
                if keyword == KEY_CHUNK and rest[:2] == b"\0\0":  # uncompressed
                    _language, _, rest = rest[2:].partition(b"\0")
                    _translated, _, value = rest.partition(b"\0")
                    return value
    except Exception:  # noqa: BLE001 - whatever is there, it names no key
        return None


def fold_aside(keys: Iterable[str]) -> frozenset[str]:
    """Of keys whose paths fold together (``keys.fold``), all but the first in code-point
    order: the keys to write under their alternative path, so that one restore's names stay
    distinct where names are compared case- or normalisation-insensitively."""
    groups: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        groups[fold(key_to_path(key))].add(key)
    return frozenset(k for group in groups.values() for k in sorted(group)[1:])


def _planned_aside(selections: list[FileSelection], storage: StorageConfig,
                   keys: frozenset[str] | None) -> frozenset[str]:
    """:func:`fold_aside` over the selected keys of a run, read from the key (and error) columns alone.

    Two passes keep the driver's memory at 8 bytes a key: first a 64-bit hash of each
    key's folded path, then the keys whose hash is shared, which are grouped exactly."""
    def hashes(batch: pa.Table) -> np.ndarray:
        return np.array([int.from_bytes(hashlib.blake2b(fold(key_to_path(k)).encode("utf-8", "surrogatepass"),
                                                        digest_size=8).digest(), "little")
                         for k in batch["key"].to_pylist()], dtype=np.uint64)

    def selected_keys() -> Iterable[pa.Table]:
        dataset = read_selected(selections, storage, keys=keys, columns=["key", "error"])
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            yield split_file_rows(batch)[0]

    seen = [hashes(batch) for batch in selected_keys()]
    values, counts = np.unique(np.concatenate(seen) if seen else np.zeros(0, np.uint64), return_counts=True)
    shared = set(values[counts > 1].tolist())
    if not shared:
        return frozenset()
    return fold_aside(k for batch in selected_keys() for k, h in zip(batch["key"].to_pylist(), hashes(batch).tolist())
                      if h in shared)


def run_restore(config: RestoreConfig) -> dict[str, Any]:
    """Restore the selected keys (all by default) as PNG under ``config.output``; return the summary.

    Ray must be initialised by the caller.
    """
    run_id = config.run_id or new_run_id()
    started = time.time()
    files = archive_files(config.archive, config.storage)
    if not files:
        raise FileNotFoundError(f"no archive data files under {config.archive}")
    keys = frozenset(config.keys) if config.keys is not None else None
    selections = key_rows(files, keys) if keys is not None else all_rows(files)
    selected = {s.path for s in selections}
    plan = sized_plan(config.resources, restore_worker_bytes([f for f in files if f.path in selected], config.models,
                                                             config.model, config.resources.actor_batch_size),
                      f"restore {run_id}")
    aside = _planned_aside(selections, config.storage, keys)
    dataset = read_selected(selections, config.storage, keys=keys)
    dataset = plan.apply(dataset, RestoreRecords, {
        "models": config.models, "model": config.model, "device": config.device,
        "torch_threads": plan.torch_threads, "mode": config.mode,
    })
    dataset = plan.apply(dataset, WritePngs, {"output": config.output, "storage": config.storage,
                                              "mode": config.mode, "aside": aside})
    manifest = _write_manifest(dataset, files, keys, config, run_id)
    summary = _summarize(manifest, config, run_id, time.time() - started)
    fs, root = filesystem(config.output, config.storage)
    fs.pipe_file(posixpath.join(root, "_restore", f"{run_id}.json"), json.dumps(summary, indent=2).encode())
    return summary


def _write_manifest(dataset: ray.data.Dataset, files: list, keys: frozenset[str] | None, config: RestoreConfig,
                    run_id: str) -> pa.Table:
    """Stream the manifest rows into OUTPUT/_restore/<run>.parquet, adding a row for each
    unreadable archive file and for each asked-for key that no readable file holds.

    Such a key is ``not_in_archive`` only when every file could be read. Otherwise the
    keys of the unreadable files are unknown (their key pages may be the damaged ones), so
    it is ``unreadable_file``, naming the files that could not be read: it may be in one.
    """
    tables, failures = [], {}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        batch, failed = split_file_rows(batch)
        failures |= failed
        if batch.num_rows:
            tables.append(batch)
    unreadable = [f for f in with_read_failures(files, failures) if f.error]
    extra = [{"key": None, "status": UNREADABLE_FILE, "error": f.error, "archive_file": f.path, "mode": config.mode}
             for f in unreadable]
    found = {k for t in tables for k in t["key"].to_pylist()}
    missing = sorted(keys - found) if keys is not None else []
    if unreadable:
        names = ", ".join(f.path for f in unreadable)
        extra += [{"key": k, "status": UNREADABLE_FILE, "mode": config.mode,
                   "archive_file": unreadable[0].path if len(unreadable) == 1 else None,
                   "error": f"key not in any readable archive file; it may be in the {len(unreadable)} that could "
                            f"not be read: {names}"} for k in missing]
    else:
        extra += [{"key": k, "status": NOT_IN_ARCHIVE, "error": "key not in archive", "mode": config.mode}
                  for k in missing]
    manifest = pa.concat_tables([*tables, pa.Table.from_pylist(extra, schema=MANIFEST_SCHEMA)])
    fs, root = filesystem(config.output, config.storage)
    fs.makedirs(posixpath.join(root, "_restore"), exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer, compression="zstd")
    fs.pipe_file(posixpath.join(root, "_restore", f"{run_id}.parquet"), buffer.getvalue())
    return manifest


def _summarize(manifest: pa.Table, config: RestoreConfig, run_id: str, seconds: float) -> dict[str, Any]:
    statuses = Counter(manifest["status"].to_pylist())
    return {
        "run_id": run_id, "archive": config.archive, "output": config.output, "mode": config.mode,
        "requested": len(config.keys) if config.keys is not None else None,
        "rows": manifest.num_rows, "restored": statuses.get(OK, 0), "statuses": dict(sorted(statuses.items())),
        "manifest": posixpath.join(config.output, "_restore", f"{run_id}.parquet"),
        "seconds": round(seconds, 2), "config": _public(config),
    }


def _public(config: RestoreConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["storage"] = config.storage.public()
    data["keys"] = len(config.keys) if config.keys is not None else None
    return data
