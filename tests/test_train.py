"""Training (pipeline.train.run_train): the three phases run, log, checkpoint, resume and export a loadable model."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.metrics import lpips_backbone_path
from corrdiff.training import coded_latent, phase0_loss
from corrdiff.trainer import MIN_CROP, PhaseConfig, TrainConfig
from pipeline.train import run_train

from conftest import smooth_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _small_crops_are_fine_here():
    """Tests train a tiny model on 64 px crops for speed; the crop-size warning is tested below."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*px crops give a hyper-latent")
        yield


def _two_photos(folder: Path) -> None:
    folder.mkdir()
    for photo in sorted((ROOT / "examples" / "photos").glob("*.jpg"))[:2]:
        shutil.copy(photo, folder)


def _config(tmp_path: Path, steps: tuple[int, int, int]) -> TrainConfig:
    return TrainConfig(
        name="tiny-test", data=str(tmp_path / "photos"), output=str(tmp_path / "run"), lmbda=0.01,
        phases=[PhaseConfig(0, steps[0], 1e-3), PhaseConfig(1, steps[1], 1e-3),
                PhaseConfig(2, steps[2], 1e-4, perceptual_weight=1.0)],
        model=tiny_config(), crop=64, batch_size=2, log_every=1, checkpoint_every=2, device="cpu",
    )


@pytest.mark.skipif(not lpips_backbone_path("alex").exists(), reason="LPIPS weights not installed (scripts/setup.sh)")
def test_phases_run_resume_and_export(tmp_path):
    _two_photos(tmp_path / "photos")
    run_train(_config(tmp_path, (3, 2, 1)))
    log = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [(r["phase"], r["step"]) for r in log] == [("0", "1"), ("0", "2"), ("0", "3"), ("1", "1"), ("1", "2"), ("2", "1")]
    assert float(log[0]["bpp"]) > 0 and float(log[0]["psnr"]) > 0 and float(log[-1]["lpips"]) > 0

    # A rerun of a finished run trains nothing more: it only exports again.
    run_train(_config(tmp_path, (3, 2, 1)))
    assert len(list(csv.DictReader(open(tmp_path / "run" / "log.csv")))) == 6

    codec = CorrDiffCodec.from_pretrained(tmp_path / "run" / "tiny-test.safetensors", device="cpu")
    image = np.asarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3)), dtype=np.uint8)
    [record] = codec.encode([image])
    assert codec.decode([record])[0].shape == image.shape


@pytest.mark.skipif(not lpips_backbone_path("alex").exists(), reason="LPIPS weights not installed (scripts/setup.sh)")
@pytest.mark.parametrize(("phase", "trained", "frozen"), [(2, "score", ("latent", "decoder")),
                                                          (0, "decoder", ("latent", "score"))])
def test_train_latent_false_keeps_the_codec_and_every_record_byte(tmp_path, phase, trained, frozen):
    """train_latent: false fine-tunes f_theta (phase 2) or D (phase 0, here with LPIPS) alone:
    same encoder and entropy model, so every record keeps its latent bytes."""
    _two_photos(tmp_path / "photos")
    base = _config(tmp_path, (2, 0, 0))
    base.phases = base.phases[:1]
    base_path = run_train(base)
    tuned = _config(tmp_path, (0, 0, 0))
    tuned.phases = [PhaseConfig(phase, 2, 1e-3, perceptual_weight=1.0, train_latent=False)]
    tuned.init, tuned.output = str(base_path), str(tmp_path / "tuned")
    tuned_path = run_train(tuned)
    log = list(csv.DictReader(open(tmp_path / "tuned" / "log.csv")))
    assert [r["phase"] for r in log] == [str(phase)] * 2 and all(float(r["lpips"]) > 0 for r in log)

    before = CorrDiffCodec.from_pretrained(base_path, device="cpu")
    after = CorrDiffCodec.from_pretrained(tuned_path, device="cpu")
    for name in frozen:
        old, new = getattr(before.model, name).state_dict(), getattr(after.model, name).state_dict()
        assert all(torch.equal(old[key], new[key]) for key in old), name
    old, new = getattr(before.model, trained).parameters(), getattr(after.model, trained).parameters()
    assert not all(torch.equal(a, b) for a, b in zip(old, new))
    image = np.asarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3)), dtype=np.uint8)
    [old_record], [new_record] = before.encode([image]), after.encode([image])
    old, new = before.parse(old_record), after.parse(new_record)
    assert (old.z_string, old.y_strings) == (new.z_string, new.y_strings) and len(old_record) == len(new_record)


def test_a_frozen_codec_trains_its_decoders_on_the_decoded_latent_and_logs_the_coded_rate(codec):
    """With the codec frozen, D (and f_theta) learn from exactly what a decoder reads from a
    record, not the float hyper-synthesis's near copy, and the logged rate is the bytes'."""
    x = torch.stack([torch.from_numpy(smooth_image(64, 64, seed)).permute(2, 0, 1).float() / 255 for seed in (1, 2)])
    model = codec.model
    streams, _ = model.latent.compress(x)
    decoded = model.latent.decompress(streams, (64, 64))
    with torch.no_grad():
        y_hat, bpp = coded_latent(model, x)
        result = phase0_loss(model, x, 0.01, train_latent=False)
        expected_mse = F.mse_loss(model.decoder(decoded), x).item()
    assert torch.equal(y_hat, decoded)
    assert bpp.item() == result.metrics["bpp"] == 8 * sum(len(s.z) + len(s.y) for s in streams) / (2 * 64 * 64)
    assert result.metrics["mse"] == expected_mse and result.aux_loss is None


def test_phase_1_refuses_the_options_of_phases_0_and_2():
    with pytest.raises(ValueError, match="phase 1"):
        PhaseConfig(1, 10, 1e-4, perceptual_weight=1.0)
    with pytest.raises(ValueError, match="phase 1"):
        PhaseConfig(1, 10, 1e-4, train_latent=False)
    with pytest.raises(ValueError, match="unknown training phase 3"):
        PhaseConfig(3, 10, 1e-4)


def test_resume_continues_a_phase_mid_way(tmp_path):
    _two_photos(tmp_path / "photos")
    config = _config(tmp_path, (4, 0, 0))
    config.phases = config.phases[:1]
    config.checkpoint_every = 2
    config.phases[0].steps = 2
    run_train(config)  # runs steps 1-2 and marks phase 0 complete
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["phase_index"], state["step"]) == (1, 0)
    # Simulate a kill at step 2 of 4: the checkpoint says phase 0, step 2 (no optimizer state:
    # training goes on with a fresh one).
    state["phase_index"], state["step"] = 0, 2
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    config.phases[0].steps = 4
    run_train(config)
    steps = [r["step"] for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))]
    assert steps == ["1", "2", "3", "4"]


def test_a_killed_run_resumes_with_one_row_per_step_and_a_continuous_clock(tmp_path, monkeypatch):
    import corrdiff.trainer as train_module

    _two_photos(tmp_path / "photos")
    config = _config(tmp_path, (5, 0, 0))
    config.phases = config.phases[:1]
    real_loss, calls = train_module._loss, []

    def dies_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed after logging step 3; the last checkpoint is step 2
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_train(config)
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))] == ["1", "2", "3"]
    monkeypatch.setattr(train_module, "_loss", real_loss)
    run_train(config)
    log = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [r["step"] for r in log] == ["1", "2", "3", "4", "5"]  # step 3 redone, logged once
    seconds = [float(r["seconds"]) for r in log]
    assert seconds == sorted(seconds) and seconds[2] >= seconds[1]  # the clock goes on from step 2's


def test_crops_too_small_for_the_hyperprior_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(name="n", data="d", output="o", lmbda=0.01, phases=[], crop=MIN_CROP)  # no warning
    with pytest.warns(UserWarning, match=r"128 px crops give a hyper-latent of 2x2, all border"):
        TrainConfig(name="n", data="d", output="o", lmbda=0.01, phases=[], crop=128)
