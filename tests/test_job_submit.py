"""`ray job submit` end to end, as the README's "Run on a Ray cluster" says: token
authentication on, a token from `ray get-auth-token --generate`, `ray start --head` with the
venv's Python on the PATH, RAY_ADDRESS, and the README's submit line (`--runtime-env
configs/ray-job.yaml`, from the repository root); the job's own Python process imports the
uploaded copy of the repository.

What differs from the README, only to isolate this cluster from every other on the machine
(the `ray_local` cluster that other tests start inside this very pytest process, other
sessions' clusters), each named here:
- HOME is a private folder, so the token lives in <private>/.ray/auth_token, not the user's;
- the head gets its own free ports (GCS, dashboard, client server, dashboard agent) and its
  own temp dir, so it writes no `/tmp/ray/ray_current_cluster` and an address-less
  `ray.init()` elsewhere never joins it; the temp dir is short because Ray's Unix socket
  paths (<temp dir>/session_<date>_<pid>/sockets/plasma_store) must fit in 107 bytes;
- the submit adds `--submission-id` and `--no-wait` (then follows the logs), so the test
  can ask for the job's status;
- teardown does NOT run `ray stop`: it has no address or temp-dir filter and kills every
  Ray process on the machine (it matches process names). Instead it kills exactly the
  processes of this cluster: those whose command line names its private folder (GCS,
  raylet, dashboard, agents, the job's driver) and all their descendants (the workers,
  whose command line Ray rewrites to `ray::...`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pyarrow.dataset as pads

from corrdiff import CorrDiffCodec, tiny_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "photos"
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job runs
PHOTOS = ["aitzgorri.jpg", "life.jpg", "sunset.jpg"]
SUBMISSION_ID = "corrdiff-test-job-submit"
JOB_TIMEOUT_S = 180  # about 30 s on an idle 2-core machine; a bound, not an expectation


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(args: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _kill_cluster(marker: str) -> None:
    """Kill this test's cluster only: processes naming ``marker``, and their descendants."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    procs: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in me and marker in " ".join(proc.info["cmdline"] or []):
                procs[proc.pid] = proc
                procs |= {child.pid: child for child in proc.children(recursive=True) if child.pid not in me}
        except psutil.Error:
            pass
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def test_ray_job_submit_compresses_a_folder():
    """The README's cluster sequence on a private head with token auth: the job succeeds,
    the archive holds each of the 3 photos exactly once, and the job prints its summary."""
    work = Path(tempfile.mkdtemp(prefix="cdjob-", dir="/tmp"))  # short: Ray's socket paths
    marker = str(work)
    temp_dir, photos, archive = work / "ray", work / "in", work / "archive"
    model = work / "tiny.safetensors"
    CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu").save_pretrained(model)
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(EXAMPLES / name, photos / name)

    gcs_port, dashboard_port, client_port, agent_port = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "HOME": str(work / "home"),
            "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _run([str(BIN / "ray"), "get-auth-token", "--generate"], env, timeout=60)
        assert len((work / "home" / ".ray" / "auth_token").read_text().strip()) >= 32
        _run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
              f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
              f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
              "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
             env, timeout=90)
        # The head recorded its address in its own temp dir, not in /tmp/ray where an
        # address-less ray.init() (the ray_local fixture) would look for a cluster to join.
        assert (temp_dir / "ray_current_cluster").read_text().strip().endswith(f":{gcs_port}")
        default_file = Path("/tmp/ray/ray_current_cluster")
        assert not default_file.exists() or not default_file.read_text().strip().endswith(f":{gcs_port}")

        env["RAY_ADDRESS"] = address
        # Without the token, the cluster refuses the client.
        refused = subprocess.run([str(BIN / "ray"), "job", "list"], env=env | {"HOME": str(work)},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
        _run([str(BIN / "ray"), "job", "submit", "--runtime-env", "configs/ray-job.yaml",
              "--submission-id", SUBMISSION_ID, "--no-wait", "--",
              "python", "jobs/compress.py", "--input", str(photos), "--output", str(archive),
              "--model", str(model), "--device", "cpu", "--job-id", "submitted"],
             env, timeout=60, cwd=ROOT)
        # Follows the job's output until the job ends (whatever its outcome).
        logs = _run([str(BIN / "ray"), "job", "logs", "--follow", SUBMISSION_ID], env, timeout=JOB_TIMEOUT_S).stdout
        status = _run([str(BIN / "ray"), "job", "status", SUBMISSION_ID], env, timeout=30)
        assert f"Job '{SUBMISSION_ID}' succeeded" in status.stdout, f"job did not succeed:\n{status.stdout}\n{logs}"

        table = pads.dataset(str(archive), format="parquet").to_table()
        keys = table.column("key").to_pylist()
        assert sorted(keys) == PHOTOS  # every key exactly once
        assert table.column("error").null_count == table.num_rows
        assert set(table.column("job_id").to_pylist()) == {"submitted"}
        assert f"archive        {archive}" in logs
        assert "job            submitted" in logs
        assert "images         3 (3 ok, 0 errors)" in logs
        summary = json.loads((archive / "_summary.json").read_text())
        assert summary["rows"] == summary["unique_keys"] == summary["ok"] == 3
        [model_id] = summary["models"]
        assert [p.name for p in (archive / "_models").iterdir()] == [f"{model_id}.safetensors"]
    finally:
        _kill_cluster(marker)
        shutil.rmtree(work, ignore_errors=True)
