"""One writer per archive at a time: a lease file that a compress run holds while it writes.

Two compress runs into one archive would each archive the keys the other has not finished
(one key, two rows), and each run's start deletes the hidden temporary files it finds,
which may be the other run's files in flight. So a run first takes ``ARCHIVE/_lease.json``
(created exclusively: ``O_EXCL`` locally, ``If-None-Match: *`` on S3), renews it every
:data:`RENEW_EVERY_S` seconds while it runs, and deletes it at the end. A second run finds
a live lease and stops with :class:`ArchiveBusyError`, naming the holder.

A run that dies (kill -9, a lost driver node) leaves its lease behind. The next run takes
it over, with a warning, at once if the holder ran on the same host and its process is
gone (a killed local run), else after :data:`STALE_AFTER_S` seconds without renewal. The takeover (delete, then exclusive create) is not atomic: two runs
that both find the same stale lease within a moment of each other are told apart only by
the exclusive create that follows, which one of them wins.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import psutil
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import StorageConfig, filesystem

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
RENEW_EVERY_S = 60.0
STALE_AFTER_S = 600.0  # ten renewals missed: the holder is gone
MAX_LEASE_BYTES = 64 * 1024  # a lease file is untrusted input, read bounded


class ArchiveBusyError(RuntimeError):
    """Another run holds the archive's lease."""


@contextmanager
def archive_lease(url: str, storage: StorageConfig, job_id: str, stale_after_s: float = STALE_AFTER_S,
                  renew_every_s: float = RENEW_EVERY_S) -> Iterator[dict[str, Any]]:
    """Hold the archive's lease for the duration of the block (see the module)."""
    fs, root = filesystem(url, storage)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, LEASE_FILE)
    lease = {"job_id": job_id, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
             "taken_at": time.time()}
    _take(fs, path, lease, stale_after_s)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, lease, stop, renew_every_s), daemon=True,
                               name=f"lease-{job_id}")
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        if _holder(fs, path).get("token") == lease["token"]:
            fs.rm(path)


def _take(fs: fsspec.AbstractFileSystem, path: str, lease: dict[str, Any], stale_after_s: float) -> None:
    for _ in range(2):  # at most one stale lease to replace
        try:
            _create(fs, path, _encode(lease, time.time()))
            return
        except FileExistsError:
            holder = _holder(fs, path)
            age = time.time() - float(holder.get("renewed_at", 0.0) or 0.0)
            if holder and age < stale_after_s and not _died_here(holder):
                raise ArchiveBusyError(
                    f"the archive is being written by job {holder.get('job_id')!r} (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, lease renewed {age:.0f} s ago); wait for it to finish, or, if it "
                    f"died, rerun after its lease goes stale ({stale_after_s:.0f} s without renewal) or delete "
                    f"{fs.unstrip_protocol(path)}") from None
            logger.warning("taking over the lease of job %r (not renewed for %.0f s%s)", holder.get("job_id"),
                           age, ", and its process on this host is gone" if _died_here(holder) else "")
            fs.rm(path)
    raise ArchiveBusyError(f"another run took the archive's lease first ({fs.unstrip_protocol(path)})")


def _died_here(holder: dict[str, Any]) -> bool:
    """Whether the holder ran on this host and its process is gone (a killed local run: its
    lease need not wait to go stale). A reused pid only makes this say "alive": safe."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not psutil.pid_exists(pid)


def _renew(fs: fsspec.AbstractFileSystem, path: str, lease: dict[str, Any], stop: threading.Event,
           every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            if _holder(fs, path).get("token") != lease["token"]:
                logger.error("job %s lost the archive's lease to another run; its files so far are kept, but "
                             "the two runs may both archive some keys", lease["job_id"])
                return
            _overwrite(fs, path, _encode(lease, time.time()))
        except Exception as error:  # noqa: BLE001 - a missed renewal is retried at the next tick
            logger.warning("could not renew the archive's lease: %s", error)


def _create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` only if nothing is there, atomically where the store can."""
    if isinstance(fs, LocalFileSystem):
        # Written in full under a private name, then hard-linked: link() fails if the name
        # exists, and no reader ever sees a half-written lease.
        temp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        try:
            os.link(temp, path)
        finally:
            os.unlink(temp)
        return
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs: a conditional PUT (If-None-Match: *)
    except FileExistsError:
        raise
    except OSError as error:
        if "PreconditionFailed" in str(error) or "412" in str(error):
            raise FileExistsError(path) from error
        raise


def _overwrite(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace the lease's content so that no reader sees it half-written (which would read
    as a broken, so stale, lease): a rename on local disks; an S3 PUT is atomic already."""
    if isinstance(fs, LocalFileSystem):
        temp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
        return
    fs.pipe_file(path, data)


def _holder(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """The lease's content, {} if it is gone or unreadable (a broken lease is a stale one)."""
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read(MAX_LEASE_BYTES + 1)
        holder = json.loads(data) if len(data) <= MAX_LEASE_BYTES else {}
    except (FileNotFoundError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _encode(lease: dict[str, Any], renewed_at: float) -> bytes:
    return json.dumps({**lease, "renewed_at": renewed_at}).encode()
