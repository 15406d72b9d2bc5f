"""Model stages and image decoding in child processes (pipeline.isolation,
pipeline.image_decoder): real process deaths, no Ray.

The stage below stands in for a model stage; what it does to its own process on some keys
(SIGKILL as the out-of-memory killer sends it, a segmentation fault in native code, a
memory hog) is real, and so is everything the actor then does about it.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.image_decoder import ImageDecoder
from pipeline.images import decode_image
from pipeline.isolation import StageSetupError, WorkerLimits, isolated

MiB = 2**20
PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "photos").glob("*.jpg"))


class PoisonStage:
    """Echoes its keys with its process id; some keys are poison to its process."""

    def __init__(self, marker_dir: str, fail_setup: bool = False, load_seconds: float = 0.0) -> None:
        if fail_setup:
            raise FileNotFoundError("no weights at /nowhere/model.safetensors")
        time.sleep(load_seconds)  # as loading a model takes a while
        self.marker_dir, self.pid = Path(marker_dir), os.getpid()

    def __call__(self, batch: pa.Table) -> pa.Table:
        for key in batch["key"].to_pylist():
            if key == "oom-killed":
                os.kill(os.getpid(), signal.SIGKILL)
            if key == "segfault":
                ctypes.string_at(0)
            if key == "hog":
                hog = bytearray(600 * MiB)
                hog[::4096] = b"x" * len(hog[::4096])  # touch every page: resident, not just reserved
                time.sleep(5)
            if key.startswith("flaky"):  # dies the first time only, as a transient fault would
                marker = self.marker_dir / key
                if not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            if key == "bug":
                raise KeyError("a bug in the stage")
        return pa.table({"key": batch["key"], "status": ["ok"] * batch.num_rows, "pid": [self.pid] * batch.num_rows})

    @classmethod
    def lost(cls, batch: pa.Table, reason: str, settings: dict[str, Any]) -> pa.Table:
        return pa.table({"key": batch["key"], "status": [reason] * batch.num_rows,
                         "pid": pa.array([None] * batch.num_rows, pa.int64())})


def _stage(tmp_path: Path, **limits: Any):
    return isolated(PoisonStage)({"marker_dir": str(tmp_path)}, WorkerLimits(**limits))


def _batch(*keys: str) -> pa.Table:
    return pa.table({"key": list(keys)})


def test_a_row_that_kills_its_worker_becomes_an_error_row_and_the_rest_is_kept(tmp_path):
    stage = _stage(tmp_path)
    first_child = stage.child.process.pid
    out = stage(_batch("a", "oom-killed", "b", "segfault", "c")).to_pylist()
    assert [row["key"] for row in out] == ["a", "oom-killed", "b", "segfault", "c"]
    status = {row["key"]: row["status"] for row in out}
    assert status["a"] == status["b"] == status["c"] == "ok"
    assert status["oom-killed"] == "worker died (retryable): killed by SIGKILL (out of memory?) (tried 2 time(s) alone)"
    assert status["segfault"].startswith("worker died (retryable): killed by SIGSEGV (a crash in native code)")
    # The worker was replaced, and the replacement goes on serving batches.
    assert first_child not in {row["pid"] for row in out}
    assert stage(_batch("d")).column("status").to_pylist() == ["ok"]


def test_a_transient_death_costs_nothing(tmp_path):
    out = _stage(tmp_path)(_batch("flaky-1", "e")).to_pylist()
    assert [row["status"] for row in out] == ["ok", "ok"]


def test_a_lone_row_is_tried_as_often_as_the_limit_says(tmp_path):
    (out,) = _stage(tmp_path, attempts=3)(_batch("oom-killed")).to_pylist()
    assert out["status"].endswith("(tried 3 time(s) alone)")


def test_the_memory_cap_kills_the_worker_before_the_node_runs_out(tmp_path):
    stage = _stage(tmp_path)
    baseline = psutil.Process(stage.child.process.pid).memory_info().rss
    stage = _stage(tmp_path, memory_bytes=baseline + 300 * MiB)
    started = time.perf_counter()
    out = stage(_batch("hog", "f")).to_pylist()
    assert out[0]["status"].startswith("worker died (retryable): it crossed its memory cap of")
    assert out[1]["status"] == "ok"
    assert time.perf_counter() - started < 4 * 5, "the hog was not killed at the cap but waited out"


def test_a_stage_that_cannot_start_says_why(tmp_path):
    with pytest.raises(StageSetupError, match="no weights at /nowhere/model.safetensors"):
        isolated(PoisonStage)({"marker_dir": str(tmp_path), "fail_setup": True}, WorkerLimits())


def test_a_worker_killed_while_it_loads_is_started_again(tmp_path):
    """Killed from outside before it is ready (out of memory while loading weights)."""
    killer_done = []

    def kill_the_first_child() -> None:
        deadline = time.time() + 30
        while time.time() < deadline and not killer_done:
            for process in psutil.Process().children():
                try:
                    command = process.cmdline()
                except psutil.Error:  # gone, or exited and not yet reaped, between the listing and the look
                    continue
                if "pipeline.isolation" in command:
                    process.kill()
                    killer_done.append(process.pid)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_first_child)
    killer.start()
    stage = isolated(PoisonStage)({"marker_dir": str(tmp_path), "load_seconds": 1.0}, WorkerLimits())
    killer.join()
    assert killer_done and stage.child.process.pid != killer_done[0]
    assert stage(_batch("a")).column("status").to_pylist() == ["ok"]


def test_a_bug_in_the_stage_fails_the_batch_instead_of_hiding(tmp_path):
    with pytest.raises(RuntimeError, match="KeyError: 'a bug in the stage'"):
        _stage(tmp_path)(_batch("bug"))


def test_the_worker_dies_with_its_actor(tmp_path):
    """An actor killed outright (SIGKILL, as Ray kills one) leaves no orphaned model process."""
    script = textwrap.dedent(f"""
        from test_isolation import _stage
        from pathlib import Path
        stage = _stage(Path({str(tmp_path)!r}))
        print(stage.child.process.pid, flush=True)
        input()
    """)
    path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])
    actor = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": path})
    child = psutil.Process(int(actor.stdout.readline()))
    actor.kill()
    actor.wait()
    child.wait(timeout=10)  # raises TimeoutExpired if the child outlived its actor


class CrashingDecoder(ImageDecoder):
    """The image decoder, with a crash in native code for one payload (as a Pillow plugin's
    on a malicious file)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if b"segfault" in batch.column("data").to_pylist():
            ctypes.string_at(0)
        return super().__call__(batch)


def test_an_image_that_crashes_the_decoder_is_a_decode_crashed_row(tmp_path):
    photo = PHOTOS[0].read_bytes()
    data = pa.array([photo, b"segfault", b"not an image"], pa.large_binary())
    out = isolated(CrashingDecoder)({"max_pixels": 10**6}, WorkerLimits())(pa.table({"data": data})).to_pylist()
    assert [row["error"] for row in out] == [
        None, "decode crashed (retryable): killed by SIGSEGV (a crash in native code) (tried 2 time(s) alone)",
        "not a recognised image format"]
    image = decode_image(photo)
    assert (out[0]["height"], out[0]["width"]) == image.shape[:2] and out[0]["pixels"] == image.tobytes()
    assert out[1]["pixels"] is None


def _decode_input(datas: list[bytes]) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(len(datas))], "source_uri": [f"/in/{i}" for i in range(len(datas))],
                     "data": pa.array(datas, pa.binary()), "error": pa.array([None] * len(datas), pa.string())})


def test_a_decompression_bomb_is_killed_at_the_cap_and_its_batch_mates_decode():
    """The compress job's decode stage, as its CPU task runs it: a 36 Mpx PNG of one colour
    (120 KB, under the pixel limit) needs ~0.5 GB to decode, over a 0.3 GiB cap; the
    decoding child is killed, and the photos around the bomb are decoded in a fresh one."""
    from pipeline.compress_stages import DecodeImages  # here: it imports Ray, which the children need not

    bomb = io.BytesIO()
    Image.new("RGB", (6000, 6000), (9, 9, 9)).save(bomb, "PNG")
    datas = [PHOTOS[0].read_bytes(), bomb.getvalue(), b"not an image", PHOTOS[1].read_bytes()]
    out = DecodeImages(max_pixels=40_000_000, limits=WorkerLimits(memory_bytes=int(0.3 * 2**30)))(_decode_input(datas))
    rows = out.drop_columns(["pixels"]).to_pylist()
    assert [row["error"] for row in rows] == [
        None, "decode crashed (retryable): it crossed its memory cap of 0.3 GiB (tried 2 time(s) alone)",
        "not a recognised image format", None]
    assert [row["source_bytes"] for row in rows] == [len(d) for d in datas]  # the bomb's size and digest are kept
    assert rows[1]["source_sha256"] == hashlib.sha256(datas[1]).hexdigest()
    pixels = out.column("pixels").combine_chunks().to_numpy()
    assert np.array_equal(pixels[0], decode_image(datas[0])) and np.array_equal(pixels[3], decode_image(datas[3]))
    assert pixels[1].size == pixels[2].size == 0


def test_limits_are_checked():
    with pytest.raises(ValueError, match="attempts"):
        WorkerLimits(attempts=0)
    with pytest.raises(ValueError, match="memory cap"):
        WorkerLimits(memory_bytes=0)


def test_an_actor_unpickles_its_model_stage_without_importing_the_model_code():
    """What Ray ships to an encode actor (the isolated class, its settings) opens without
    torch or the codec: only the child imports them (about 1 GB and 9 s of a CPU each)."""
    from ray import cloudpickle

    from pipeline.isolation import sealed
    from pipeline.models import ModelSources
    from pipeline.compress_stages import EncodeImages
    from pipeline.storage import StorageConfig

    shipped = cloudpickle.dumps((isolated(EncodeImages), sealed({"models": ModelSources("/archive", StorageConfig())})))
    code = textwrap.dedent("""
        import sys
        from ray import cloudpickle
        stage, settings = cloudpickle.loads(sys.stdin.buffer.read())
        assert stage.stage_path == "pipeline.compress_stages:EncodeImages" and isinstance(settings, bytes)
        heavy = sorted(name for name in ("torch", "corrdiff", "compressai", "pipeline.compress_stages") if name in sys.modules)
        print("imported:", heavy)
    """)
    completed = subprocess.run([sys.executable, "-c", code], input=shipped, capture_output=True, timeout=120)
    assert completed.stdout.decode().strip() == "imported: []", completed.stderr.decode()[-2000:]
