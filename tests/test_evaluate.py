"""Classic baselines at a matched rate, and the evaluate command end to end on the tiny model.

Why: a comparison is only fair if the baselines really run at CorrDiff's rate and the rate
is measured on the bytes a reader stores; and the report's files are what people read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image, features

from conftest import smooth_image
from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.baselines import CLASSIC_CODECS, QUALITY_RANGE, decode_classic, encode_classic, match_bpp
from corrdiff.evaluation import wins
from corrdiff.metrics import LPIPS, lpips_backbone_path
from pipeline.cli import main as cli
from pipeline.evaluation_report import LABELS

@pytest.fixture(scope="module")
def grace_hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def test_pillow_has_avif_built_in() -> None:
    assert features.check("avif"), "Pillow lacks AVIF: install pillow-avif-plugin or a Pillow built with libavif"


@pytest.mark.parametrize("codec", CLASSIC_CODECS)
def test_classic_round_trip_keeps_the_shape(codec: str) -> None:
    image = smooth_image(37, 53)
    decoded = decode_classic(encode_classic(image, codec, 80))
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 10


def test_encode_classic_refuses_out_of_range_quality() -> None:
    with pytest.raises(ValueError, match="quality"):
        encode_classic(smooth_image(8, 8), "jpeg", 0)


@pytest.mark.parametrize("codec", CLASSIC_CODECS)
def test_match_bpp_lands_within_five_percent(grace_hopper: np.ndarray, codec: str) -> None:
    result = match_bpp(grace_hopper, codec, 0.5)
    height, width = grace_hopper.shape[:2]
    assert result.within_tolerance and abs(result.bpp - 0.5) <= 0.025, (result.quality, result.bpp)
    assert result.bpp == 8 * len(result.data) / (height * width)
    assert np.array_equal(result.reconstruction, decode_classic(result.data))


def test_match_bpp_reports_an_unreachable_target(grace_hopper: np.ndarray) -> None:
    result = match_bpp(grace_hopper, "jpeg", 0.001)  # below JPEG's headers alone
    assert not result.within_tolerance
    assert result.quality == QUALITY_RANGE["jpeg"][0]


needs_lpips = pytest.mark.skipif(not (lpips_backbone_path("alex").is_file() and lpips_backbone_path("vgg").is_file()),
                                 reason="LPIPS AlexNet and VGG weights not installed (scripts/setup.sh)")


@needs_lpips
def test_evaluate_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    codec = CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu")
    model_path = tmp_path / "tiny.safetensors"
    codec.save_pretrained(model_path)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images = {"a.png": smooth_image(176, 200, seed=1), "b.png": smooth_image(64, 80, seed=2),
              "too_small.png": smooth_image(20, 20, seed=3)}
    for name, image in images.items():
        Image.fromarray(image).save(image_dir / name)
    output = tmp_path / "eval"

    assert cli(["evaluate", "--images", str(image_dir), "--model", str(model_path), "--output", str(output),
                "--curve-qualities", "20,60"]) == 0

    printed = capsys.readouterr().out
    assert "skipping" in printed and "too_small.png" in printed
    report = json.loads((output / "eval.json").read_text())
    assert report["model"] == {"name": "tiny", "id": codec.model_id_hex, "path": str(model_path)}
    assert {"torch", "pillow"} <= set(report["versions"]) and report["date"]
    assert report["gamma_fit"] == "closed-form MSE"
    assert report["coding"] == {"format_version": 3, "tile": 512, "tile_overlap": 64, "tile_batch": 1}
    assert "Records: format 3, tiles of 512 px overlapping by 64, 1 per score-network call." in printed
    assert [Path(im["url"]).name for im in report["images"]] == ["a.png", "b.png"]
    methods = ["corrdiff", "e2e", "diffusion", "jpeg", "webp", "avif"]
    for entry in report["images"]:
        image = images[Path(entry["url"]).name]
        [record] = codec.encode([image])
        assert entry["record_bytes"] == len(record)
        assert list(entry["methods"]) == methods
        for mode in ("corrdiff", "e2e", "diffusion"):
            assert entry["methods"][mode]["bpp"] == 8 * len(record) / (image.shape[0] * image.shape[1])
        assert (entry["methods"]["corrdiff"]["ms_ssim"] is None) == (min(image.shape[:2]) <= 160)
        for result in entry["methods"].values():  # three perceptual networks, three opinions
            assert result["lpips"] > 0 and result["lpips_vgg"] > 0 and result["dists"] > 0
            assert len({result["lpips"], result["lpips_vgg"], result["dists"]}) == 3
    assert list(report["averages"]) == methods
    for name in CLASSIC_CODECS:
        assert [point["quality"] for point in report["curves"][name]] == [20, 60]
        assert report["curves"][name][0]["bpp"] < report["curves"][name][1]["bpp"]
        assert "dists" not in report["curves"][name][0]  # matched-rate rows only (corrdiff/evaluation.py)
    jpeg_60 = [(8 * len(data) / (image.shape[0] * image.shape[1]), LPIPS("vgg")(image, decode_classic(data)))
               for image in (images["a.png"], images["b.png"]) for data in [encode_classic(image, "jpeg", 60)]]
    assert report["curves"]["jpeg"][1]["bpp"] == pytest.approx(np.mean([bpp for bpp, _ in jpeg_60]), rel=1e-12)
    assert report["curves"]["jpeg"][1]["lpips_vgg"] == pytest.approx(np.mean([v for _, v in jpeg_60]), rel=1e-6)

    for other in methods[1:]:  # each count re-derived from the per-image numbers
        ours = [entry["methods"]["corrdiff"] for entry in report["images"]]
        theirs = [entry["methods"][other] for entry in report["images"]]
        assert report["wins"][other] == {
            "psnr": {"better": sum(a["psnr"] > b["psnr"] for a, b in zip(ours, theirs)), "of": 2},
            "lpips": {"better": sum(a["lpips"] < b["lpips"] for a, b in zip(ours, theirs)), "of": 2},
            "lpips_vgg": {"better": sum(a["lpips_vgg"] < b["lpips_vgg"] for a, b in zip(ours, theirs)), "of": 2},
            "dists": {"better": sum(a["dists"] < b["dists"] for a, b in zip(ours, theirs)), "of": 2},
        }

    table = (output / "eval.md").read_text()
    averages, counts = table.split("Images where the corrdiff decode does better")
    rows = [line for line in averages.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == [LABELS[m] for m in methods]
    assert "| LPIPS-alex | LPIPS-vgg | DISTS |" in averages
    count_rows = [line for line in counts.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in count_rows] == [LABELS[m] for m in methods[1:]]
    jpeg_row = count_rows[2].split(" | ")
    assert jpeg_row[2] == f"{report['wins']['jpeg']['lpips']['better']} of 2"
    assert jpeg_row[4] == f"{report['wins']['jpeg']['dists']['better']} of 2 |"
    assert table in printed
    with Image.open(output / "rate_quality.png") as plot:
        assert plot.format == "PNG" and plot.width > 500


def test_wins_count_strict_improvements_and_skip_undefined_values() -> None:
    def image(corrdiff: dict, jpeg: dict) -> dict:
        return {"methods": {"corrdiff": corrdiff, "jpeg": jpeg}}

    per_image = [
        image({"psnr": 30.0, "lpips": 0.2, "lpips_vgg": 0.3, "dists": 0.1},
              {"psnr": 29.0, "lpips": 0.25, "lpips_vgg": 0.3, "dists": 0.2}),
        image({"psnr": 25.0, "lpips": 0.4, "lpips_vgg": 0.5, "dists": 0.3},
              {"psnr": 26.0, "lpips": 0.3, "lpips_vgg": 0.6, "dists": 0.2}),
        image({"psnr": None, "lpips": 0.1, "lpips_vgg": 0.1, "dists": 0.1},
              {"psnr": 40.0, "lpips": 0.2, "lpips_vgg": 0.2, "dists": 0.3}),
    ]
    assert wins(per_image) == {"jpeg": {
        "psnr": {"better": 1, "of": 2},  # identical images (PSNR undefined) are not counted
        "lpips": {"better": 2, "of": 3},
        "lpips_vgg": {"better": 2, "of": 3},  # a tie is not a win
        "dists": {"better": 2, "of": 3},
    }}
    assert wins([{"methods": {"e2e": per_image[0]["methods"]["jpeg"]}}]) == {}


@needs_lpips
def test_evaluate_command_in_perceptual_mode_says_so(tmp_path: Path) -> None:
    """The perceptual gamma fit changes what the sampler is told, never the record's size."""
    codec = CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu")
    model_path = tmp_path / "tiny.safetensors"
    codec.save_pretrained(model_path)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    image = smooth_image(64, 80, seed=2)
    Image.fromarray(image).save(image_dir / "b.png")
    output = tmp_path / "eval"

    assert cli(["evaluate", "--images", str(image_dir), "--model", str(model_path), "--output", str(output),
                "--modes", "corrdiff", "--baselines", "jpeg", "--curve-qualities", "",
                "--gamma-refine-steps", "2", "--gamma-lr", "0.2", "--gamma-metric", "dists"]) == 0

    report = json.loads((output / "eval.json").read_text())
    assert report["gamma_fit"] == "closed-form MSE, then 2 Adam steps (lr 0.2) on MSE + DISTS"
    [entry] = report["images"]
    [record] = codec.encode([image])
    assert entry["record_bytes"] == len(record)
    assert "2 Adam steps (lr 0.2)" in (output / "eval.md").read_text()
    assert report["curves"] == {} and (output / "rate_quality.png").is_file()  # no curve asked for, none traced
