"""Model stages in a child process: an input that kills its worker costs one row, not the job.

An image can kill the process that encodes or restores it: the kernel's out-of-memory
killer (a 24 Mpx photo needs ~13 GB of a CPU worker today, docs/benchmarks.md), a crash in
native code. Ray's answer is to restart the actor and run the same batch again, forever by
default, so one such image hangs the job. Here the Ray actor (``IsolatedStage``) keeps no
model: it runs the stage in a child process (``python -m pipeline.isolation``), watches
it, and when the child dies it starts a fresh one, retries that batch one row at a time
and, for a row that killed the child :attr:`WorkerLimits.attempts` times alone, emits the
stage's own row for "could not be processed" with the reason (the signal, or the memory
cap that was crossed). The job finishes, and every input is a row.

The child also has a memory cap (:attr:`WorkerLimits.memory_bytes`): the actor kills it
when its resident memory crosses the cap, before the kernel or Ray's memory monitor picks
a victim on the node (which could be the raylet, or another image's worker).

Whatever runs here follows one contract (:class:`Isolatable`, which every
``pipeline.stage.ModelStage`` and the image decoder keep): constructed from keyword
settings (loading its model once), called with a batch, and able to say, without its
model, what a batch of rows becomes when the worker died on them (``lost``).

The actor imports nothing of its stage: it holds the stage's import path and its settings
as pickled bytes, which only the child opens, and asks a fresh child for the ``lost`` rows.
Unpickling a model stage (or settings that name the model library) imports torch and the
codec, about 1 GB and 9 s of a CPU per process: paid once per actor in its child, not
twice, and the actor's memory stays that of a Ray worker. The model
stages run in actors; image decoding, which needs no model, runs the same way inside its
CPU tasks (pipeline.image_decoder).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import psutil

from pipeline.errors import retryable

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # how often the actor checks its child's liveness and memory while it works
DEFAULT_MEMORY_FRACTION = 0.8  # of the node's memory, the default cap of one child
WORKER_DIED = "worker died"  # the error kind of a row that killed its worker (unless its stage names another)
Batch = pa.Table | dict[str, np.ndarray]


class Isolatable(Protocol):
    """What :class:`IsolatedStage` needs of the class it runs in a child process.

    A stage class may also name what its deaths are called in error rows with a class
    attribute ``death`` (default :data:`WORKER_DIED`): image decoding says "decode crashed".
    """

    def __init__(self, **settings: Any) -> None: ...  # loads the model, once per child

    def __call__(self, batch: Any) -> pa.Table: ...

    @classmethod
    def lost(cls, batch: Any, reason: str, settings: dict[str, Any]) -> pa.Table:
        """The output rows for ``batch`` when its worker died processing it (no model needed)."""
        ...


@dataclass(frozen=True)
class WorkerLimits:
    """How a model stage's child process is bounded."""

    # Resident memory at which the child is killed (its row then gets an error);
    # None: DEFAULT_MEMORY_FRACTION of the node's memory.
    memory_bytes: int | None = None
    # Times one row may kill its worker, alone, before it becomes an error row. The first
    # death of a batch is not counted against its rows: any of them may have caused it.
    attempts: int = 2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("worker attempts must be >= 1")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError("worker memory cap must be > 0 bytes")

    def memory_cap(self) -> int:
        return self.memory_bytes or int(DEFAULT_MEMORY_FRACTION * psutil.virtual_memory().total)


class WorkerDied(RuntimeError):
    """The child process died (or was killed at its memory cap) while working."""


class StageSetupError(RuntimeError):
    """The stage could not start in its child (e.g. its model could not be loaded)."""


class IsolatedStage:
    """A Ray Data callable class that runs the stage named :attr:`stage_path` in a child
    process (see the module).

    Use :func:`isolated` to get the subclass for one stage class; Ray Data names the
    operator after it (``MapBatches(EncodeImages)``). ``settings``: the stage's keyword
    settings, or those already pickled (:func:`sealed`), as a driver passes them to actors
    so that the actor never unpickles them.
    """

    stage_path: ClassVar[str]  # "module:qualname" of the stage class
    stage_name: ClassVar[str]

    def __init__(self, settings: dict[str, Any] | bytes, limits: WorkerLimits) -> None:
        self.settings = settings if isinstance(settings, bytes) else sealed(settings)
        self.limits = limits
        self.child = self._start()

    def __call__(self, batch: Batch) -> pa.Table:
        try:
            return self._run(batch)
        except WorkerDied as death:
            rows = _num_rows(batch)
            logger.warning("%s: its worker process died on a batch of %d row(s) (%s); retrying them one at a time",
                           self.stage_name, rows, death)
            if rows == 1:
                return self._row(batch, deaths=1, last=death)
            return pa.concat_tables([self._row(_row(batch, i), deaths=0, last=death) for i in range(rows)])

    def _row(self, row: Batch, deaths: int, last: WorkerDied) -> pa.Table:
        while deaths < self.limits.attempts:
            try:
                return self._run(row)
            except WorkerDied as death:
                deaths, last = deaths + 1, death
        detail = f"{last} (tried {deaths} time(s) alone)"
        logger.error("%s: a row killed its worker: %s; recorded as an error row", self.stage_name, detail)
        if not self.child.alive():
            self.child = self._start()
        return self.child.lost(row, detail)

    def _run(self, batch: Batch) -> pa.Table:
        if not self.child.alive():
            self.child = self._start()
        return self.child.call(batch)

    def _start(self) -> _Child:
        """A new child with the stage loaded. A child that dies while loading (killed from
        outside, out of memory) is started again, up to ``limits.attempts`` times; a stage
        that raises while loading (e.g. its model is nowhere) fails at once."""
        for _ in range(self.limits.attempts):
            try:
                return _Child(self.stage_path, self.settings, self.limits.memory_cap())
            except WorkerDied as death:
                last = death
                logger.warning("%s: its worker process died while loading (%s); starting another",
                               self.stage_name, death)
        raise StageSetupError(f"{self.stage_name} could not start: its worker process died "
                              f"{self.limits.attempts} time(s) while loading, the last {last}")

    def close(self) -> None:
        """Stop the child now (a task's stage, done with its batch); an actor's child ends with it."""
        child = getattr(self, "child", None)
        if child is not None:
            child.stop()

    def __del__(self) -> None:
        self.close()


_ISOLATED: dict[type, type[IsolatedStage]] = {}


def isolated(stage: type[Isolatable]) -> type[IsolatedStage]:
    """The :class:`IsolatedStage` subclass that runs ``stage`` (one per stage class), named
    as the stage names itself (its ``name``, else its class name). It holds the stage's
    import path, not the class: unpickled in an actor, it imports nothing."""
    if stage not in _ISOLATED:
        name = getattr(stage, "name", stage.__name__)
        _ISOLATED[stage] = type(name, (IsolatedStage,), {
            "stage_path": f"{stage.__module__}:{stage.__qualname__}", "stage_name": name, "__module__": __name__})
    return _ISOLATED[stage]


def sealed(settings: dict[str, Any]) -> bytes:
    """A stage's settings pickled, to be opened only in its child process."""
    return pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)


class _Child:
    """One child process holding one stage instance, spoken to over a socket pair."""

    def __init__(self, stage_path: str, settings: bytes, memory_cap: int) -> None:
        self.memory_cap = memory_cap
        ours, theirs = socket.socketpair()
        # The child imports what the actor imports: the same sys.path (a Ray runtime
        # environment's working directory included).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.isolation", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.psutil = psutil.Process(self.process.pid)
        try:
            try:
                self.connection.send((stage_path, settings))
            except OSError:
                raise self._died() from None
            status, payload = self._reply()
        except WorkerDied:
            self.connection.close()
            raise
        if status != "ready":
            self.stop()
            raise StageSetupError(f"{stage_path} could not start:\n{payload}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, batch: Batch) -> pa.Table:
        """The stage's rows for ``batch``."""
        return self._request(("call", batch))

    def lost(self, batch: Batch, detail: str) -> pa.Table:
        """The stage's rows for ``batch`` whose processing killed a worker (``detail``: how)."""
        return self._request(("lost", batch, detail))

    def _request(self, message: tuple) -> pa.Table:
        try:
            self.connection.send(message)
        except OSError:
            raise self._died() from None
        status, payload = self._reply()
        if status != "ok":  # a bug in the stage, not an input: fail like any UDF would
            raise RuntimeError(f"stage failed in its worker process:\n{payload}")
        return payload

    def _reply(self) -> tuple[str, Any]:
        while not self.connection.poll(POLL_SECONDS):
            if not self.alive():
                raise self._died()
            if self._rss() > self.memory_cap:
                self.process.kill()
                self.process.wait()
                raise WorkerDied(f"it crossed its memory cap of {_gib(self.memory_cap)}")
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _rss(self) -> int:
        try:
            return self.psutil.memory_info().rss
        except psutil.Error:
            return 0  # exited between the checks: the next liveness check says how

    def _died(self) -> WorkerDied:
        code = self.process.wait()
        if code < 0:
            name = signal.Signals(-code).name
            why = " (out of memory?)" if -code == signal.SIGKILL else " (a crash in native code)" \
                if -code in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL) else ""
            return WorkerDied(f"killed by {name}{why}")
        return WorkerDied(f"exited with status {code}")

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()
        self.connection.close()


def _num_rows(batch: Batch) -> int:
    return batch.num_rows if isinstance(batch, pa.Table) else len(next(iter(batch.values())))


def _row(batch: Batch, index: int) -> Batch:
    if isinstance(batch, pa.Table):
        return batch.slice(index, 1)
    return {name: column[index:index + 1] for name, column in batch.items()}


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _serve(connection: Connection, parent: int) -> None:
    """The child: build the stage, then answer requests until the actor closes the socket."""
    _die_with_parent(parent)
    stage_path, sealed_settings = connection.recv()
    try:
        module, _, name = stage_path.partition(":")
        stage_class = getattr(importlib.import_module(module), name)
        settings = pickle.loads(sealed_settings)
        stage = stage_class(**settings)
    except BaseException:  # noqa: BLE001 - reported to the actor, which fails the stage's start
        connection.send(("setup_failed", traceback.format_exc()))
        return
    connection.send(("ready", None))
    while True:
        try:
            request, batch, *detail = connection.recv()
        except EOFError:
            return
        try:
            if request == "call":
                reply = ("ok", stage(batch))
            else:
                # Retryable: a death says more about the worker's memory than about the
                # input, and a rerun (with a higher cap, or on a larger node) may get through.
                reason = retryable(getattr(stage_class, "death", WORKER_DIED), detail[0])
                reply = ("ok", stage_class.lost(batch, reason, settings))
        except BaseException:  # noqa: BLE001 - the actor raises it as the stage's failure
            reply = ("error", traceback.format_exc())
        try:
            connection.send(reply)
        except pickle.PicklingError:
            connection.send(("error", traceback.format_exc()))


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this child when its actor dies (even by SIGKILL), so that no
    orphaned model keeps a node's memory or GPU; elsewhere the closed socket ends it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the actor died before the request took effect
        os._exit(1)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), parent=int(sys.argv[2]))
