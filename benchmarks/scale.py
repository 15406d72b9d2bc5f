"""What planning a job costs the driver as an archive grows: seconds and peak memory.

    python benchmarks/scale.py [--keys 1000000] [--files 100] [--kinds manifest,tar,parquet]
        [--workdir DIR] [--json FILE]

Builds a synthetic archive of ``--keys`` rows in ``--files`` data files (the project's own
schema and layout, records of 16 bytes: what is measured is planning and I/O, not
encoding), and for each source kind a synthetic input whose keys are those of the archive,
1 % of them not yet archived (for sharded sources: half of each of 2 % of the shards, as a
killed run leaves them). Then, each in a fresh process (so that its peak RSS is its
own), the driver's side of:

- ``rerun_plan``: what a rerun does before the first image is fetched, on a local Ray
  cluster of this machine's cores: for a manifest, reading it in tasks and the
  hash-partitioned anti-join of the listing against the archive's keys
  (``pipeline.listing.list_manifest``, ``pipeline.pending.pending_images``); for tar and
  Parquet shards the listing in tasks, the markers and the archived keys of the unfinished
  shards only, grouped by shard (``pipeline.shards.resume_shards``).
  ``worker_peak_private_mb``: the largest Ray worker process seen (sampled every 0.1 s),
  less the object store's shared pages it has mapped (``worker_peak_rss_mb`` with them; why
  they are left out: ``_WorkerPeak``), and each task's largest;
  ``task_payload_mb``: the largest shard's pickled done keys, which its read task receives
  (a worker's memory);
- ``summary``: the job summary (``pipeline.summary.summarize``);
- ``verify_plan`` and ``audit_plan``: the footers and the selection of ``--verify-all``
  and of an audit sample of 1000 rows (``pipeline.selection``);
- ``restore_keys``: ``restore --keys`` of 10 keys (``decode_keys`` in the results of 2026-12-02
  and before): the footers, then what the read tasks do
  (here one after another in this process): the files whose key range can hold the keys,
  their row groups that can, and the records of those that do.

The files source kind is measured through a manifest: a real folder of 10 M files cannot be
made here; its listing (delimiter listings in tasks) meets the same anti-join after it.

Goals (issue 23): driver memory flat in the number of keys (at most 1 GB at 10 M keys),
rerun planning of 10 M keys under a minute, a rerun over finished tar shards reads none of
them (here: the shards to read are the 2 % with missing keys). It ends by printing each
goal that one run can judge as MET or NOT MET (flatness takes two runs: compare them).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STEPS = ("rerun_plan", "summary", "verify_plan", "audit_plan", "restore_keys")
MEMBERS_PER_SHARD = 1000
MISSING = 0.01


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="rows of the synthetic archive")
    parser.add_argument("--files", type=int, default=100, help="data files of the archive")
    parser.add_argument("--kinds", default="manifest,tar,parquet", help="source kinds, comma-separated")
    parser.add_argument("--workdir", help="where to build (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: measure one step in this process
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.step:
        print(json.dumps(_measure(args.step, args.kind, Path(args.workdir))))
        return
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    with tempfile.TemporaryDirectory(prefix="corrdiff-scale-") as scratch:
        root = Path(args.workdir or scratch)
        results = []
        for kind in kinds:
            started = time.perf_counter()
            _build(root / kind, kind, args.keys, args.files)
            print(f"{kind}: built {args.keys:,} keys in {time.perf_counter() - started:.1f} s", flush=True)
            for step in STEPS:
                completed = subprocess.run([sys.executable, __file__, "--step", step, "--kind", kind,
                                            "--workdir", str(root / kind)], capture_output=True, text=True)
                if completed.returncode != 0:
                    raise SystemExit(f"{kind} {step} failed:\n{completed.stderr[-3000:]}")
                result = {"kind": kind, "keys": args.keys, "step": step, **json.loads(completed.stdout.splitlines()[-1])}
                results.append(result)
                print(_line(result), flush=True)
        goals = _goals(results, args.keys)
        print("\n".join(goals))
        report = {"keys": args.keys, "files": args.files, "cpus": os.cpu_count(),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results,
                  "goals": goals}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


GOAL_MB = 1024  # driver and worker memory, at most (issue 23)
GOAL_SECONDS = 60  # rerun planning, under


def _goals(results: list[dict], keys: int) -> list[str]:
    """Each goal of issue 23 that one run can judge, MET or NOT MET, per source kind: memory
    at this size (flat in the number of keys takes runs at two sizes), planning time, and
    that a rerun over shards reads only those a killed run left unfinished."""
    lines = []
    for result in (r for r in results if r["step"] == "rerun_plan"):
        driver = result["peak_rss_mb"] - result["baseline_rss_mb"]
        checks = [(f"driver memory beyond the imports at most {GOAL_MB} MB", driver <= GOAL_MB, f"{driver:.0f} MB"),
                  (f"largest worker at most {GOAL_MB} MB (private: RSS less the object store's pages)",
                   result["worker_peak_private_mb"] <= GOAL_MB,
                   f"{result['worker_peak_private_mb']:.0f} MB, RSS {result['worker_peak_rss_mb']:.0f} MB"),
                  (f"rerun planning under {GOAL_SECONDS} s", result["seconds"] < GOAL_SECONDS,
                   f"{result['seconds']:.1f} s")]
        if "shards_to_read" in result:
            unfinished = max(1, round(2 * MISSING * -(-keys // MEMBERS_PER_SHARD)))
            checks.append(("finished shards not read", result["shards_to_read"] == unfinished,
                           f"{result['shards_to_read']} read, {unfinished} unfinished"))
        lines += [f"{result['kind']:9} {'MET' if met else 'NOT MET':8} {goal}: {value}" for goal, met, value in checks]
    return lines


def _line(result: dict) -> str:
    extra = "".join(f"  {k} {v}" for k, v in result.items()
                    if k not in ("kind", "keys", "step", "seconds", "peak_rss_mb", "baseline_rss_mb"))
    return (f"{result['kind']:9} {result['step']:12} {result['seconds']:8.2f} s  peak RSS {result['peak_rss_mb']:7.0f} MB "
            f"(imports {result['baseline_rss_mb']:.0f} MB){extra}")


# Building -----------------------------------------------------------------------------------


def _keys(kind: str, n: int, source: Path = Path("/in")) -> tuple[list[str], list[str], list[str]]:
    """Each row's key, source URI and shard (the source object it comes from, in ``source``)."""
    index = np.arange(n)
    if kind == "manifest":
        keys = [f"photos/{i % 1000:03d}/{i:010d}.jpg" for i in index]
        return keys, [f"s3://bucket/{k}" for k in keys], keys
    shards = [f"shard-{i // MEMBERS_PER_SHARD:07d}.{'tar' if kind == 'tar' else 'parquet'}" for i in index]
    if kind == "tar":
        keys = [f"{s}/{i:010d}.jpg" for s, i in zip(shards, index)]
        return keys, [f"{source}/{s}#{i:010d}.jpg" for s, i in zip(shards, index)], shards
    keys = [f"id{i:010d}" for i in index]
    return keys, [f"{source}/{s}#{k}" for s, k in zip(shards, keys)], shards


def _build(root: Path, kind: str, n: int, files: int) -> None:
    """The archive (all keys but a seeded 1 %), the input (every key), shard markers."""
    from pipeline.archive import SCHEMA, data_file_bytes
    from pipeline.shards import MARKERS_DIR, marker_name

    archive, source = root / "archive", root / "in"
    archive.mkdir(parents=True)
    source.mkdir()
    keys, uris, shards = _keys(kind, n, source)
    missing = _missing(kind, n)
    archived = np.flatnonzero(~missing)
    now = pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC"))
    for part, rows in enumerate(np.array_split(archived, files)):
        count = len(rows)
        table = pa.table({
            "key": pa.array([keys[i] for i in rows], pa.string()),
            "source_uri": pa.array([uris[i] for i in rows], pa.string()),
            "record": pa.array([b"\x00" * 16] * count, pa.binary()),
            "record_bytes": pa.array([16] * count, pa.int64()),
            "width": pa.array([64] * count, pa.int32()), "height": pa.array([64] * count, pa.int32()),
            "bpp": pa.array([16 * 8 / 4096] * count), "created_at": pa.array([now] * count),
            "job_id": pa.array(["bench"] * count),
        })
        table = pa.table({name: table[name] if name in table.column_names else pa.nulls(count, SCHEMA.field(name).type)
                          for name in SCHEMA.names}, schema=SCHEMA)
        (archive / f"part-bench-{part:05d}.parquet").write_bytes(data_file_bytes(table))
    if kind == "manifest":
        pq.write_table(pa.table({"key": keys, "uri": uris}), source / "manifest.parquet")
        return
    unfinished = {shards[i] for i in np.flatnonzero(missing)}
    (archive / MARKERS_DIR).mkdir()
    for shard in sorted(set(shards)):
        path = source / shard
        if kind == "tar":
            path.write_bytes(b"never read in planning")
        else:  # the listing reads the first file's schema
            pq.write_table(pa.table({"key": pa.array([], pa.string()), "image": pa.array([], pa.binary())}), path)
        if shard not in unfinished:
            stat = path.stat()
            (archive / MARKERS_DIR / marker_name(shard, stat.st_size, f"mtime={stat.st_mtime}")).write_text("{}")


def _missing(kind: str, n: int) -> np.ndarray:
    """Which keys are not archived yet: 1 % of them. A manifest's at random; a sharded
    source's as a killed run leaves them: the second half of the members of 2 % of the
    shards (seeded), the other shards finished."""
    rng = np.random.default_rng(0)
    if kind == "manifest":
        return rng.random(n) < MISSING
    shards = -(-n // MEMBERS_PER_SHARD)
    partial = rng.choice(shards, size=max(1, round(2 * MISSING * shards)), replace=False)
    index = np.arange(n)
    return np.isin(index // MEMBERS_PER_SHARD, partial) & (index % MEMBERS_PER_SHARD >= MEMBERS_PER_SHARD // 2)


# Measuring (in a fresh process per step) ------------------------------------------------


def _measure(step: str, kind: str, root: Path) -> dict:
    import ray

    from pipeline.archive import read_data_file_rows
    from pipeline.pending import pending_images
    from pipeline.selection import all_rows, archive_files, key_rows, sample_rows
    from pipeline.shards import resume_shards
    from pipeline.skipped import Skipped
    from pipeline.sources import SourceConfig, list_images, list_shards
    from pipeline.storage import StorageConfig, filesystem
    from pipeline.summary import summarize

    storage, archive = StorageConfig(), str(root / "archive")
    if step == "rerun_plan":  # planning runs in tasks: on a local cluster, its workers measured
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        workers = _WorkerPeak()
    baseline = _rss_mb()
    load = os.getloadavg()[0]  # the machine is shared: seconds depend on what else runs
    started = time.perf_counter()
    extra: dict = {}
    if step == "rerun_plan":
        if kind == "manifest":
            listing = list_images(SourceConfig(url=str(root / "in" / "manifest.parquet"), kind="manifest"), storage)
            listed = time.perf_counter()
            pending = pending_images(listing, archive, storage)
            extra = {"to_read": pending.rows, "listing_seconds": round(listed - started, 1),
                     "anti_join_seconds": round(time.perf_counter() - listed, 1)}
        else:
            listing = list_shards(SourceConfig(url=str(root / "in"), kind=kind), storage)
            resume = resume_shards(archive, storage, kind, listing, "bench")
            done = resume.listing.items["done"].to_pylist()
            extra = {"shards": listing.items.num_rows, "shards_to_read": resume.listing.items.num_rows,
                     "done_keys_held": resume.done_keys,  # the largest shard's keys, as its read task gets them
                     "task_payload_mb": round(max((len(pickle.dumps(keys)) for keys in done), default=0) / 2**20, 2)}
        extra.update(workers.stop())
    elif step == "summary":
        summarize(archive, storage, "bench", 1.0, Skipped())
    elif step in ("verify_plan", "audit_plan"):
        files = archive_files(archive, storage)
        selections = all_rows(files) if step == "verify_plan" else sample_rows(files, 1000, seed=0)
        extra = {"files_selected": len(selections)}
    elif step == "restore_keys":
        files = archive_files(archive, storage)
        keys = tuple(sorted(_keys(kind, 10)[0]))  # ten archived keys (the first ten)
        fs, _ = filesystem(archive, storage)
        selections = key_rows(files, frozenset(keys))
        found = 0
        for selection in selections:
            table, _ = read_data_file_rows(selection.path, fs, ["key", "record"], keys=keys)
            found += table.num_rows
        extra = {"found": found, "files_read": len(selections)}
    else:
        raise SystemExit(f"unknown step {step}")
    return {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": round(_rss_mb(), 1),
            "baseline_rss_mb": round(baseline, 1), "load_average": round(load, 1), **extra}


class _WorkerPeak:
    """The largest memory of a worker process (``ray::...``) of this process's own Ray
    cluster (its descendants: ``ray.init`` starts the raylet, the raylet the workers) while
    it runs, sampled; other clusters' workers on the machine are not counted. Each sample is
    also charged to the task the worker runs then (its title, ``ray::<task>``), so that the
    largest can be told apart: a reader, a split or a join.

    Two figures: RSS, and private memory, RSS less the shared-memory pages of the object
    store that the worker has mapped (``RssShmem``; Ray's own memory monitor leaves out all
    shared pages). Those pages are the object store's, bounded by its capacity and spilled
    to disk beyond it, and a worker keeps them in its RSS once touched: a worker that wrote
    a tenth of a 10 M-row listing into the store counts that tenth as long as the listing
    lives, so RSS grows with the collection even where a task's own memory does not."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.rss: dict[str, int] = {}
        self.private: dict[str, int] = {}
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.wait(0.1):
            for process in me.children(recursive=True):
                try:
                    title = " ".join(process.cmdline())
                    if title.startswith("ray::"):
                        rss, shared = _status_kb(process.pid, "VmRSS", "RssShmem")
                        task = title.split()[0][len("ray::"):]
                        self.rss[task] = max(self.rss.get(task, 0), rss)
                        self.private[task] = max(self.private.get(task, 0), rss - shared)
                except (psutil.Error, OSError):  # ended between the listing and the look
                    pass

    def stop(self) -> dict:
        """The largest worker's RSS and private memory in MB, and each task's largest
        private memory, largest first."""
        self._done.set()
        self._thread.join()
        by_task = sorted(self.private.items(), key=lambda item: -item[1])
        return {"worker_peak_rss_mb": round(max(self.rss.values(), default=0) / 1024, 1),
                "worker_peak_private_mb": round(max(self.private.values(), default=0) / 1024, 1),
                "worker_peak_private_mb_by_task": {task: round(kb / 1024, 1) for task, kb in by_task}}


def _status_kb(pid: int, *fields: str) -> list[int]:
    """Fields of ``/proc/<pid>/status``, in kB (0 if absent)."""
    with open(f"/proc/{pid}/status") as status:
        found = {name: int(value.split()[0]) for name, _, value in (line.partition(":") for line in status)
                 if name in fields}
    return [found.get(name, 0) for name in fields]


def _rss_mb() -> float:
    """This process's peak RSS so far (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries
    that across fork and exec, so a step's process would report at least the RSS of the
    parent that built the synthetic data (3.2 GB at 10 M keys) as its own."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB


if __name__ == "__main__":
    main()
