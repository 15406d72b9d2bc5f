"""The GPU call, rehearsed on the CPU: scripts/device_train.sh end to end with a tiny config,
a run killed mid-way, and the pieces a GPU run uses that nothing else here does (bf16
autocast, crops cut on the device, size-bounded checkpoints, the wall-clock budget)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.metrics import lpips_backbone_path
from corrdiff.model import CorrDiffModel
from corrdiff.train_runtime import CheckpointStore, DeviceCrops, RandomCrops, cosine_lr, phase_ends
from corrdiff.training import phase0_loss, phase1_loss, phase2_loss, trainable_parameters
from pipeline.image_folder import load_images
from corrdiff.trainer import PhaseConfig, TrainConfig
from corrdiff.typed_config import load_config
from pipeline.train import run_train

ROOT = Path(__file__).resolve().parents[1]

PHOTOS = ROOT / "examples" / "photos"
REHEARSAL = "configs/train/rehearsal-tiny.yaml"
DEVICE_FILE_LIMIT = 16 * 2**20  # the device tool brings back files of at most 16 MiB ...
DEVICE_MAX_FILES = 8  # ... at most 8 of them ...
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # ... named in these characters alone
HAS_LPIPS = lpips_backbone_path("alex").is_file()


@pytest.fixture(autouse=True)
def _small_crops_and_one_thread():
    """Tiny crops are fine here (the crop-size warning is tested in test_train.py). One torch
    thread: on two cores shared with the child processes, two threads wait on each other
    (a tiny model's round trip took 9.6 s with two, 1.4 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*px crops give a hyper-latent")
        yield
    torch.set_num_threads(threads)


def _photo_crop() -> np.ndarray:
    """A real photo, cut to an odd size (padding and cropping are exercised)."""
    return np.asarray(Image.open(PHOTOS / "sunset.jpg").convert("RGB"))[7:207, 13:290]


def _assert_device_can_return(out: Path) -> list[Path]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= DEVICE_MAX_FILES, [p.name for p in files]
    for path in files:
        assert path.stat().st_size <= DEVICE_FILE_LIMIT, path
        assert len(path.relative_to(out).parts) <= 3, path  # $OUT/a/b/file at the deepest
        assert all(DEVICE_NAME.match(part) for part in path.relative_to(out).parts), path
    return files


def _assert_round_trip(model_path: Path) -> None:
    codec = CorrDiffCodec.from_pretrained(model_path, device="cpu")
    image = _photo_crop()
    [encoded] = codec.encode_detailed([image])
    [restored] = codec.decode([encoded.record])
    assert restored.shape == image.shape and np.array_equal(restored, encoded.reconstruction)
    assert 0 < encoded.bpp < 24


# ------------------------------------------------------------------------- the rehearsal
def test_the_device_command_rehearsed_on_the_cpu(tmp_path):
    """scripts/device_train.sh as the device runs it (60 s of training, a tiny model, the
    example photos): every file fits the device tool's return rules, the log covers every
    phase, and the exported model loads and round-trips a real photo crop."""
    out = tmp_path / "OUT"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    started = time.monotonic()
    completed = subprocess.run(
        ["bash", "scripts/device_train.sh", REHEARSAL, "60", "--data", str(PHOTOS), "--threads", "1",
         "--max-file-mib", "1.5", "--checkpoint-seconds", "15", "--time-megapixels", "0.05",
         "--benchmark", "bare", "--bench-megapixels", "0.05", "--bench-photos", "2", "--bench-repeat", "1",
         "--bench-cpus", "1", "--total-seconds", "150"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.monotonic() - started
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    files = _assert_device_can_return(out)
    names = {p.name for p in files}
    assert {"device.log", "log.csv", "results.json", "checkpoint.pt", "corrdiff-rehearsal-tiny.safetensors"} <= names
    assert all(p.stat().st_size <= 1.5 * 2**20 for p in files)

    log = (out / "device.log").read_text()
    assert "== summary" in log and "== 2. training" in log
    rows = list(csv.DictReader(open(out / "log.csv")))
    phases = [r["phase"] for r in rows]
    assert phases[0] == "0" and "1" in phases and all(float(r["loss"]) == float(r["loss"]) for r in rows)
    assert all(r["steps_per_s"] for r in rows if r["phase"] == "0")  # per-interval speed logged
    if HAS_LPIPS:
        assert phases[-1] == "2" and all(r["lpips"] for r in rows)
    else:
        assert "2" not in phases and "SKIPPED" in log

    results = json.loads((out / "results.json").read_text())
    assert results["entropy_coding"]["codec_round_trip"] is True
    check = results["model_check"]
    assert check["decode_equals_encode"] is True and check["latent_equal_on_cpu"] is True
    assert sorted(check["tile_batches"], key=int) == ["2", "4", "16"]
    assert all(timed["decode_equals_encode"] and timed["decode_s_per_mpx"] > 0 for timed in check["tile_batches"].values())
    assert results["benchmark"]["exit"] == 0 and results["benchmark"]["results"]["bare"]["images_per_second"] > 0
    training = results["training"]
    assert training["exit"] == 0 and training["seconds"] < 60 + 30
    assert len(training["phases"]) == (4 if HAS_LPIPS else 3)
    _assert_round_trip(out / "corrdiff-rehearsal-tiny.safetensors")
    print(f"rehearsal: {seconds:.0f} s, steps per phase {[p['steps'] for p in training['phases']]}")


def test_the_device_command_fails_fast_without_data(tmp_path):
    out = tmp_path / "OUT"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    completed = subprocess.run(["bash", "scripts/device_train.sh", REHEARSAL, "60", "--data", str(tmp_path / "none"),
                                "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 3
    results = json.loads((out / "results.json").read_text())
    assert "environment" in results["failed"] and "training" not in results


# ------------------------------------------------------------------------- a killed run
def test_a_run_killed_mid_phase_leaves_a_loadable_model_and_a_resumable_state(tmp_path):
    """Killed (SIGKILL) after its first clock checkpoint: the exported model loads and
    round-trips; the state, its optimizer in a shard, resumes the phase where it stopped."""
    config = tmp_path / "kill.yaml"
    config.write_text(textwrap.dedent(f"""
        name: kill-test
        data: {PHOTOS}
        output: {tmp_path / "OUT"}
        lmbda: 0.0067
        crop: 64
        batch_size: 2
        log_every: 5
        checkpoint_every: 1000000
        threads: 1
        model:
          latent: {{hyper_channels: 8, latent_channels: 12}}
          decoder_channels: 12
          score: {{base_channels: 8, channel_mults: [1, 2], res_blocks: 1, latent_cond_channels: 4,
                   time_embed_dim: 16, groups: 4}}
          diffusion: {{steps: 4}}
        phases:
          - {{phase: 1, steps: 1000000, lr: 1.0e-4}}
    """))
    out = tmp_path / "OUT"
    process = subprocess.Popen(
        [sys.executable, "jobs/train.py", "--config", str(config), "--max-seconds", "120",
         "--checkpoint-seconds", "2", "--export-checkpoints", "--max-file-mib", "1.3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoint-optimizer-0.pt").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (out / "checkpoint-optimizer-0.pt").exists(), "no sharded checkpoint within 90 s"
    _assert_device_can_return(out)
    assert all(p.stat().st_size <= 1.3 * 2**20 for p in out.iterdir())
    _assert_round_trip(out / "kill-test.safetensors")

    state = CheckpointStore(out, int(1.3 * 2**20)).load()
    assert state["phase_index"] == 0 and state["step"] > 0 and state["optimizer"]["state"]
    stopped_at, rows_kept = state["step"], state["log_rows"]

    resumed = load_config(TrainConfig, str(config), {"max_seconds": 25, "max_file_mib": 1.3})
    resumed.phases[0].steps = stopped_at + 10
    run_train(resumed)
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))]
    assert len(steps) == rows_kept + len([s for s in steps if s > stopped_at])
    assert steps == sorted(steps) and steps[-1] == stopped_at + 10  # it went on, not from 0
    _assert_round_trip(out / "kill-test.safetensors")


# ------------------------------------------------------------------------- bf16 autocast
def _dtype_hooks(model: CorrDiffModel) -> tuple[dict[str, set], list]:
    seen: dict[str, set] = {"g_a": set(), "decoder": set(), "score": set()}
    handles = []
    for name, module in (("g_a", model.latent.g_a[0]), ("decoder", model.decoder.g_s[0]), ("score", model.score.inp)):
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen[name].add(o.dtype)))
    return seen, handles


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_bf16_autocast_runs_the_networks_in_bf16_and_the_latent_codec_in_fp32(phase):
    """The GPU path's precision, on the CPU: the score network (and a training D) compute in
    bf16; the latent codec, whose y is rounded, in fp32; losses and gradients are finite and
    close to the fp32 ones."""
    torch.manual_seed(0)
    model = CorrDiffModel(tiny_config())
    x = torch.from_numpy(_photo_crop()[:64, :128].copy()).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255
    params, _ = trainable_parameters(model, phase)
    if phase != 0:
        model.latent.freeze()
    perceptual = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731 - any differentiable stand-in

    def loss(amp):
        generator = torch.Generator().manual_seed(1)
        if phase == 0:
            return phase0_loss(model, x, 0.0067, amp=amp)
        if phase == 1:
            return phase1_loss(model, x, generator, amp=amp)
        return phase2_loss(model, x, 0.0067, perceptual, 1.0, generator=generator, amp=amp)

    reference = loss(None).loss.item()
    seen, handles = _dtype_hooks(model)
    result = loss(torch.bfloat16)
    for handle in handles:
        handle.remove()
    result.loss.backward()
    assert seen["g_a"] == {torch.float32}
    assert seen["decoder"] == ({torch.bfloat16} if phase == 0 else {torch.float32})
    assert seen["score"] == (set() if phase == 0 else {torch.bfloat16})
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert result.loss.item() == pytest.approx(reference, rel=0.05)


def test_measure_false_skips_only_what_the_log_needs(codec):
    """Unmeasured steps compute the same training loss without the coded bytes or metrics."""
    model = codec.model
    x = torch.from_numpy(_photo_crop()[:64, :64].copy()).permute(2, 0, 1)[None].float() / 255
    measured = phase1_loss(model, x, torch.Generator().manual_seed(3))
    quiet = phase1_loss(model, x, torch.Generator().manual_seed(3), measure=False)
    assert quiet.metrics == {} and torch.equal(quiet.loss, measured.loss)
    frozen = phase0_loss(model, x, 0.01, train_latent=False)
    frozen_quiet = phase0_loss(model, x, 0.01, train_latent=False, measure=False)
    assert frozen_quiet.metrics == {}
    assert frozen_quiet.loss.item() == pytest.approx(frozen.loss.item() - frozen.metrics["bpp"], abs=1e-4)


def test_quantize_gives_compress_latent_without_coding(codec):
    x = torch.from_numpy(_photo_crop()[:128, :192].copy()).permute(2, 0, 1)[None].float() / 255
    _, y_hat = codec.model.latent.compress(x)
    assert torch.equal(codec.model.latent.quantize(x).y_hat, y_hat)


# ------------------------------------------------------------------------- crops on the device
def test_device_crops_draw_what_random_crops_draw():
    images = [image for _, image in load_images(str(PHOTOS), 64)]
    exact = DeviceCrops(images, 64, seed=5).batch(6)
    assert torch.equal(exact, RandomCrops(images, 64, seed=5).batch(6))
    scaled = DeviceCrops(images, 96, seed=7, min_scale=0.3)
    lanczos = RandomCrops(images, 96, seed=7, min_scale=0.3)
    for _ in range(3):
        a, b = scaled.batch(4), lanczos.batch(4)
        assert a.shape == b.shape == (4, 3, 96, 96) and a.dtype == torch.float32
        assert torch.equal(a, (a * 255).round() / 255)  # 8-bit values, as RandomCrops gives
        mse = ((a - b) ** 2).flatten(1).mean(1)
        assert (10 * torch.log10(1 / mse) > 25).all()  # the same regions; only the filter differs
    assert scaled.reseed(7).batch(4).shape == (4, 3, 96, 96)


# ------------------------------------------------------------------------- checkpoints
def _optimizer_state(parameters: int = 6, size: int = 40_000) -> dict:
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(parameters)]
    optimizer = torch.optim.Adam(params)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    return optimizer.state_dict()


def test_checkpoints_split_the_optimizer_into_shards_within_the_file_limit(tmp_path):
    limit = 1_000_000
    store = CheckpointStore(tmp_path, limit)
    state = {"model": {"w": torch.randn(50_000)}, "phase_index": 1, "step": 7, "optimizer": _optimizer_state(),
             "aux_optimizer": {}, "elapsed": 3.0, "log_rows": 2}
    written = store.save(state)
    assert len(written) >= 3 and all(p.stat().st_size <= limit for p in tmp_path.iterdir())
    loaded = store.load()
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    for key, value in state["optimizer"]["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][key]["exp_avg_sq"], value["exp_avg_sq"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]

    # A kill between a new shard and the new head: the weights load, the optimizer starts afresh.
    stale = torch.load(store.shard_path(0), weights_only=True)
    store.save(dict(state, step=8))
    torch.save(stale, store.shard_path(0))
    resumed = store.load()
    assert resumed["step"] == 8 and resumed["optimizer"] == {}

    # Without an optimizer state the checkpoint is one file again; old shards go.
    store.save(dict(state, optimizer={}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_model_too_large_for_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "photos").mkdir()
    shutil.copy(PHOTOS / "life.jpg", tmp_path / "photos")
    config = TrainConfig(name="big", data=str(tmp_path / "photos"), output=str(tmp_path / "run"), lmbda=0.01,
                         phases=[PhaseConfig(0, 5, 1e-3)], model=tiny_config(), crop=64, batch_size=1,
                         device="cpu", max_file_mib=0.5)
    with pytest.raises(ValueError, match="exported model takes"):
        run_train(config)
    assert not (tmp_path / "run" / "log.csv").exists()


# ------------------------------------------------------------------------- budget and LPIPS
def test_phase_ends_split_the_budget_cumulatively():
    assert phase_ends(100.0, 200.0, [0.5, 0.2, 0.3]) == pytest.approx([150.0, 170.0, 200.0])
    assert phase_ends(0.0, 60.0, [2, 1]) == pytest.approx([40.0, 60.0])
    with pytest.raises(ValueError):
        phase_ends(0.0, 1.0, [1.0, 0.0])
    assert cosine_lr(1e-3, 1e-5, 0.0) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 1e-5, 1.0) == pytest.approx(1e-5)
    assert cosine_lr(1e-3, None, 0.7) == 1e-3


def test_fractions_are_given_to_every_phase_or_none():
    with pytest.raises(ValueError, match="fraction"):
        TrainConfig(name="n", data="d", output="o", lmbda=0.01,
                    phases=[PhaseConfig(0, 5, 1e-3, fraction=0.5), PhaseConfig(1, 5, 1e-3)])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(name="n", data="d", output="o", lmbda=0.01, phases=[], precision="fp16")


def test_a_budgeted_run_without_lpips_skips_the_phases_that_need_it(tmp_path, monkeypatch):
    import corrdiff.trainer as train_module

    (tmp_path / "photos").mkdir()
    for name in ("life.jpg", "sunset.jpg"):
        shutil.copy(PHOTOS / name, tmp_path / "photos")
    monkeypatch.setattr(train_module, "optional_lpips", lambda device: (None, "ImportError: no lpips here"))
    config = TrainConfig(name="nolpips", data=str(tmp_path / "photos"), output=str(tmp_path / "run"), lmbda=0.01,
                         phases=[PhaseConfig(0, 10**6, 1e-3, fraction=0.5),
                                 PhaseConfig(2, 10**6, 1e-4, perceptual_weight=1.0, fraction=0.5)],
                         model=tiny_config(), crop=64, batch_size=1, log_every=5, device="cpu", threads=1)
    with pytest.raises(RuntimeError, match="--lpips optional"):
        run_train(config)
    config.lpips, config.max_seconds = "optional", 12.0
    started = time.monotonic()
    run_train(config)
    assert time.monotonic() - started < 12.0 + 4.0
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert rows and {r["phase"] for r in rows} == {"0"} and not any(r["lpips"] for r in rows)
    _assert_round_trip(tmp_path / "run" / "nolpips.safetensors")


def test_the_training_path_imports_without_ray_pyarrow_lpips_or_msssim_extras():
    """A GPU machine may lack Ray and pyarrow (or have ones that do not import): the
    training job and its image folder must not need them; LPIPS reports itself missing."""
    code = textwrap.dedent("""
        import sys
        for name in ("ray", "pyarrow", "lpips", "boto3", "s3fs"):
            sys.modules[name] = None
        import pipeline.cli, pipeline.train  # the train command and what it runs
        from corrdiff.train_runtime import optional_lpips
        metric, why = optional_lpips("cpu")
        assert metric is None and "lpips" in why, why
        print("ok")
    """)
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-3000:]
