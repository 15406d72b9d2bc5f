"""End-to-end behaviour of the public codec API on a tiny random model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from corrdiff import CorrDiffCodec, ModelMismatchError, RecordError
from corrdiff.record import Record

from conftest import smooth_image


def test_decode_equals_encoder_simulation_exactly(codec, images, encoded):
    decoded = codec.decode([e.record for e in encoded])
    for image, enc, dec in zip(images, encoded, decoded):
        assert dec.shape == image.shape and dec.dtype == np.uint8
        assert np.array_equal(dec, enc.reconstruction)


def test_unknown_decode_mode_names_the_valid_ones(codec, encoded):
    with pytest.raises(ValueError, match="unknown decode mode 'ee2e'; choose one of corrdiff, e2e, diffusion"):
        codec.decode([encoded[0].record], mode="ee2e")


@pytest.mark.parametrize("mode", ["e2e", "diffusion", "corrdiff"])
def test_every_mode_returns_the_original_size(codec, images, encoded, mode):
    for image, dec in zip(images, codec.decode([e.record for e in encoded], mode=mode)):
        assert dec.shape == image.shape and dec.dtype == np.uint8


def test_bpp_comes_from_the_record_bytes(encoded, images):
    for enc, image in zip(encoded, images):
        assert enc.bpp == 8 * len(enc.record) / (image.shape[0] * image.shape[1])
        record = Record.from_bytes(enc.record)
        assert len(record.z_string) > 0 and all(record.y_strings)


def test_gamma_zero_record_decodes_like_diffusion_only(codec, encoded):
    record = Record.from_bytes(encoded[2].record)
    zeroed = Record(**{**record.__dict__, "gammas": (0.0,) * record.steps}).to_bytes()
    corrdiff = codec.decode([zeroed], mode="corrdiff")[0]
    diffusion = codec.decode([encoded[2].record], mode="diffusion", steps=record.steps)[0]
    assert np.array_equal(corrdiff, diffusion)


def test_gamma_one_record_decodes_like_e2e(codec, encoded):
    record = Record.from_bytes(encoded[2].record)
    ones = Record(**{**record.__dict__, "gammas": (1.0,) * record.steps}).to_bytes()
    corrdiff = codec.decode([ones], mode="corrdiff")[0].astype(int)
    e2e = codec.decode([ones], mode="e2e")[0].astype(int)
    # x0_theta + 1 * (x_e - x0_theta) is x_e up to one float rounding, which can flip a .5.
    assert np.abs(corrdiff - e2e).max() <= 1
    assert (corrdiff != e2e).mean() < 1e-3


def test_gammas_are_fitted_not_constant(encoded):
    assert len({g for e in encoded for g in e.gammas}) > 1


def test_decoding_does_not_depend_on_the_other_records(codec, encoded):
    records = [e.record for e in encoded]
    together = codec.decode(records + records[::-1])
    alone = [codec.decode([r])[0] for r in records]
    for a, b in zip(together, alone + alone[::-1]):
        assert np.array_equal(a, b)


def _digest(images: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()


def test_one_and_two_threads_decode_alike(codec, encoded):
    """The thread count can move a pixel at a rounding boundary by one level (float kernels may
    split their sums per thread count; docs/method.md, "Reproducible pixels"), never more."""
    records = [e.record for e in encoded]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codec.decode(records)
        torch.set_num_threads(2)
        two = codec.decode(records)
    finally:
        torch.set_num_threads(previous)
    for decoded in (one, two):
        for image, e in zip(decoded, encoded):
            difference = np.abs(image.astype(np.int16) - e.reconstruction.astype(np.int16))
            assert difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 1000


def test_same_bytes_in_a_fresh_process(codec, encoded, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    codec.save_pretrained(weights)
    for i, e in enumerate(encoded):
        (tmp_path / f"{i}.cdar").write_bytes(e.record)
    script = textwrap.dedent(f"""
        import hashlib, pathlib, torch
        torch.set_num_threads(1)
        from corrdiff import CorrDiffCodec
        codec = CorrDiffCodec.from_pretrained({str(weights)!r}, device="cpu")
        records = [pathlib.Path({str(tmp_path)!r}, f"{{i}}.cdar").read_bytes() for i in range({len(encoded)})]
        digest = hashlib.sha256()
        for image in codec.decode(records):
            digest.update(image.tobytes())
        print(digest.hexdigest())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == _digest([e.reconstruction for e in encoded])


def test_corrupt_record_is_an_error_not_garbage(codec, encoded):
    record = bytearray(encoded[2].record)
    record[len(record) // 2] ^= 0x10
    with pytest.raises(RecordError, match="checksum"):
        codec.decode([bytes(record)])


def test_truncated_record_is_an_error(codec, encoded):
    with pytest.raises(RecordError):
        codec.decode([encoded[2].record[:-7]])
    with pytest.raises(RecordError, match="truncated"):
        codec.decode([encoded[2].record[:10]])


def _forged(codec: CorrDiffCodec, height: int, width: int, z: bytes, y: bytes) -> bytes:
    """A record of this codec's model with any strings and a valid checksum (not a bit flip: a forgery)."""
    return Record(model_id=codec.model_id, height=height, width=width, pad_bottom=(-height) % 64,
                  pad_right=(-width) % 64, seed=0, gammas=(0.5,), z_string=z, y_strings=(y,), version=1).to_bytes()


@pytest.mark.parametrize("z, y", [(b"\0" * 8, b"\0" * 6), (b"\0" * 8, b"\0" * 4), (b"\0" * 8, b"\0" * 800_000)])
def test_strings_impossible_for_the_image_size_are_refused(codec, z, y):
    """Not whole 32-bit words, shorter than the coder's final state, or longer than any
    coding of 640 x 640 px could be: refused before the entropy decoder runs (an empty
    string, which crashed it, is in the next test: it runs in a process of its own)."""
    with pytest.raises(RecordError, match="impossible for"):
        codec.decode([_forged(codec, 640, 640, z, y)], mode="e2e")


def test_forged_strings_never_crash_the_decoder(codec, tmp_path):
    """Short, well-formed strings that claim a large image made compressai's rANS decoder
    read past their end and kill the process (a segfault). A forged record now decodes to
    whatever it decodes to, or is refused, in a process that survives."""
    weights = tmp_path / "tiny.safetensors"
    codec.save_pretrained(weights)
    (tmp_path / "empty.cdar").write_bytes(_forged(codec, 640, 640, b"", b""))
    rng = np.random.default_rng(0)
    for i in range(40):
        height, width = (int(v) for v in rng.integers(1, 900, 2))
        strings = [rng.bytes(4 * int(n)) for n in rng.integers(2, 6, 2)]
        (tmp_path / f"{i}.cdar").write_bytes(_forged(codec, height, width, *strings))
    script = textwrap.dedent(f"""
        import pathlib
        from corrdiff import CorrDiffCodec, RecordError
        codec = CorrDiffCodec.from_pretrained({str(weights)!r}, device="cpu")
        for path in sorted(pathlib.Path({str(tmp_path)!r}).glob("*.cdar")):
            try:
                codec.decode([path.read_bytes()], mode="e2e")
            except RecordError:
                pass
        print("survived")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("survived"), out.stderr[-2000:]


def test_an_image_too_large_for_a_record_is_refused_before_encoding(codec):
    strip = np.zeros((1, 2_200_000, 3), np.uint8)  # 2.2 Mpx, but 141 Mpx once padded to 64 rows
    with pytest.raises(RecordError, match="exceeds the record limit"):
        codec.encode([strip])


def test_record_from_another_model_names_both_ids(codec, other_codec, encoded):
    with pytest.raises(ModelMismatchError) as error:
        other_codec.decode([encoded[0].record])
    assert codec.model_id_hex in str(error.value) and other_codec.model_id_hex in str(error.value)


def test_corrdiff_mode_refuses_another_step_count(codec, encoded):
    with pytest.raises(ValueError, match="step count"):
        codec.decode([encoded[0].record], mode="corrdiff", steps=99)


def test_diffusion_mode_takes_any_step_count(codec, encoded):
    image = codec.decode([encoded[3].record], mode="diffusion", steps=2)[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("bad", [
    np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
    np.zeros((0, 4, 3), np.uint8),
])
def test_invalid_images_are_rejected_clearly(codec, bad):
    with pytest.raises(ValueError, match="image 0"):
        codec.encode([bad])


def test_encoding_is_deterministic_and_seeded(codec):
    image = smooth_image(70, 90, seed=5)
    assert codec.encode([image]) == codec.encode([image])
    other_seed = codec.encode([image], seed=7)[0]
    assert Record.from_bytes(other_seed).seed == 7
    assert other_seed != codec.encode([image])[0]
    assert codec.decode([other_seed])[0].shape == image.shape


def test_weights_round_trip_keeps_the_model_id(codec, tmp_path):
    path = tmp_path / "m.safetensors"
    codec.save_pretrained(path)
    loaded = CorrDiffCodec.from_pretrained(path, device="cpu")
    assert loaded.model_id == codec.model_id


def test_tampered_weights_are_refused(codec, tmp_path):
    path = tmp_path / "m.safetensors"
    codec.save_pretrained(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a bit inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        CorrDiffCodec.from_pretrained(path, device="cpu")


def test_unknown_model_name_lists_what_exists():
    with pytest.raises(FileNotFoundError, match="bundled models: corrdiff-photo"):
        CorrDiffCodec.from_pretrained("no-such-model", device="cpu")


@pytest.mark.parametrize("metric", ["lpips-alex", "lpips-vgg"])
def test_perceptual_mode_encodes_images_smaller_than_the_metric_sees(codec, images, encoded, metric):
    """Perceptual mode takes every image the default mode takes. Below the metric's
    ``min_side`` (1x1, 37x5) gamma stays the closed form, so the record is the default
    mode's byte for byte; a 64x64 image is still refined. Every record decodes to the
    reconstruction its encoder saw."""
    from corrdiff.gamma import perceptual_fitter
    from corrdiff.metrics import lpips_backbone_path, perceptual_metric

    if not lpips_backbone_path(metric.removeprefix("lpips-")).exists():  # type: ignore[arg-type]
        pytest.skip("LPIPS weights not installed (scripts/install_lpips_weights.py)")
    lpips = perceptual_metric(metric)
    perceptual = CorrDiffCodec(codec.model, device="cpu", gamma_fitter=perceptual_fitter(lpips, 3, 0.1))
    chosen = [0, 1, 3]  # 1x1, 37x5, 64x64 (the fixture's 333x500 would only cost time)
    assert [min(images[i].shape[:2]) < lpips.min_side for i in chosen] == [True, True, False]
    refined = perceptual.encode_detailed([images[i] for i in chosen])
    for i, enc in zip(chosen, refined):
        assert np.array_equal(codec.decode([enc.record])[0], enc.reconstruction)
    assert [enc.record for enc in refined[:2]] == [encoded[0].record, encoded[1].record]
    assert refined[2].gammas != encoded[3].gammas
