"""Train a CorrDiff model through its three phases, resumably, and export it.

    python jobs/train.py --config configs/train/photo-0.3.yaml [--data URL] [--output DIR]

Phases (corrdiff/training.py): 0 latent codec + D (or D alone, ``train_latent: false``,
optionally with an LPIPS term), 1 score network, 2 perceptual fine-tuning. A phase with the
codec frozen first refreshes its tables (``LatentCodec.freeze``): its losses code the
latent exactly as records do. Every ``checkpoint_every`` steps the whole state goes to
``OUTPUT/checkpoint.pt``; rerunning the same command resumes from it. Losses, bpp and
PSNR go to ``OUTPUT/log.csv``, one row per logged step even across kills and resumes, with
the seconds spent in the phase so far. At the end the model is frozen (CDF tables, fixed-point
hyper-synthesis) and written to ``OUTPUT/<name>.safetensors``. Runs on CUDA when present.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corrdiff.codec import pick_device  # noqa: E402
from corrdiff.config import ModelConfig  # noqa: E402
from corrdiff.gamma import perceptual_loss  # noqa: E402
from corrdiff.latent_codec import HYPER_STRIDE  # noqa: E402
from corrdiff.metrics import LPIPS  # noqa: E402
from corrdiff.model import CorrDiffModel  # noqa: E402
from corrdiff.training import PhaseLoss, phase0_loss, phase1_loss, phase2_loss, trainable_parameters  # noqa: E402
from corrdiff.weights import load_model, load_state, resolve, save_model  # noqa: E402
from pipeline.image_folder import RandomCrops, load_images  # noqa: E402

# Crops below 4 hyper-latent positions a side leave z almost all border: h_s then learns the
# zero padding's statistics and mispredicts the interior of every larger image, whose rate
# comes out several times too high (docs/models.md, "Crop size and the hyperprior").
MIN_CROP = 4 * HYPER_STRIDE
LOG_COLUMNS = ["phase", "step", "seconds", "lr", "loss", "bpp", "mse", "psnr", "e2e_psnr", "lpips", "gamma"]


@dataclass
class PhaseConfig:
    phase: int
    steps: int
    lr: float
    perceptual_weight: float = 0.0  # phases 0 (on D's output) and 2 (on the corrected estimate)
    train_latent: bool = True  # phases 0 and 2: false trains D / the score network alone, the rate stays put

    def __post_init__(self) -> None:
        if self.phase not in (0, 1, 2):
            raise ValueError(f"unknown training phase {self.phase}")
        if self.phase == 1 and (self.perceptual_weight or not self.train_latent):
            raise ValueError("phase 1 trains the score network alone on the diffusion loss: "
                             "perceptual_weight and train_latent apply to phases 0 and 2")


@dataclass
class TrainConfig:
    name: str
    data: str
    output: str
    lmbda: float
    phases: list[PhaseConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    crop: int = 256
    min_scale: float = 1.0
    init: str | None = None
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    log_every: int = 50
    checkpoint_every: int = 500
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.crop < MIN_CROP:
            warnings.warn(f"{self.crop} px crops give a hyper-latent of {-(-self.crop // HYPER_STRIDE)}x"
                          f"{-(-self.crop // HYPER_STRIDE)}, all border: the model will mispredict the rate of "
                          f"larger images; use crops of at least {MIN_CROP} px", stacklevel=3)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict) -> TrainConfig:
        raw = yaml.safe_load(Path(path).read_text()) | {k: v for k, v in overrides.items() if v is not None}
        raw["model"] = ModelConfig.from_dict(raw.get("model", {}))
        raw["phases"] = [PhaseConfig(**p) for p in raw["phases"]]
        return cls(**raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config (configs/train/)")
    parser.add_argument("--data", help="fsspec URL of a folder of training photos (overrides the config)")
    parser.add_argument("--output", help="directory for checkpoint, log and model (overrides the config)")
    parser.add_argument("--device", help="cpu, cuda, or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    config = TrainConfig.from_yaml(args.config, {"data": args.data, "output": args.output,
                                                  "device": args.device, "threads": args.threads})
    model_path = train(config)
    print(f"model written to {model_path}")


def train(config: TrainConfig) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(None if config.device == "auto" else config.device)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint_path = output / "checkpoint.pt"

    torch.manual_seed(config.seed)
    model = _initial_model(config).to(device)
    start_phase, start_step, saved = 0, 0, None
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=True)
        load_state(model, saved["model"])
        start_phase, start_step = saved["phase_index"], saved["step"]
        print(f"resuming from {checkpoint_path}: phase index {start_phase}, step {start_step}")

    images = [image for _, image in load_images(config.data, config.crop, config.storage_options)]
    print(f"{len(images)} training images, {sum(im.shape[0] * im.shape[1] for im in images) / 1e6:.1f} Mpx")
    needs_lpips = any(p.phase == 2 or p.perceptual_weight > 0 for p in config.phases[start_phase:])
    perceptual = perceptual_loss(LPIPS("alex", device=device)) if needs_lpips else None

    log_rows = _rewind_log(output / "log.csv", saved.get("log_rows") if saved else 0)
    with open(output / "log.csv", "a", newline="") as log_file:
        log = csv.DictWriter(log_file, LOG_COLUMNS, extrasaction="ignore")
        if log_file.tell() == 0:
            log.writeheader()
        for index in range(start_phase, len(config.phases)):
            phase = config.phases[index]
            first = start_step if index == start_phase else 0
            crops = RandomCrops(images, config.crop, seed=config.seed * 1_000_003 + index * 10_007 + first,
                                min_scale=config.min_scale)
            main_params, aux_params = trainable_parameters(model, phase.phase, phase.train_latent)
            if not aux_params:  # a frozen codec: the losses code its latent, with its current tables
                model.latent.freeze()
            optimizer = torch.optim.Adam(main_params, lr=phase.lr)
            aux_optimizer = torch.optim.Adam(aux_params, lr=1e-3) if aux_params else None
            if saved is not None and index == start_phase and first > 0 and saved["optimizer"]:
                optimizer.load_state_dict(saved["optimizer"])
                if aux_optimizer is not None and saved["aux_optimizer"]:
                    aux_optimizer.load_state_dict(saved["aux_optimizer"])
            model.train()
            started = time.time() - (saved.get("elapsed", 0.0) if saved is not None and index == start_phase else 0.0)
            for step in range(first, phase.steps):
                x = crops.batch(config.batch_size).to(device)
                result = _loss(model, x, phase, config, perceptual)
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                torch.nn.utils.clip_grad_norm_(main_params, 1.0)
                optimizer.step()
                if aux_optimizer is not None and result.aux_loss is not None:
                    aux_optimizer.zero_grad(set_to_none=True)
                    result.aux_loss.backward()
                    aux_optimizer.step()
                done = step + 1
                if done % config.log_every == 0 or done == phase.steps:
                    row = {"phase": phase.phase, "step": done, "seconds": round(time.time() - started, 1),
                           "lr": phase.lr, "loss": round(result.loss.item(), 5),
                           **{k: round(v, 5) for k, v in result.metrics.items()}}
                    log.writerow(row)
                    log_file.flush()
                    log_rows += 1
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                if done % config.checkpoint_every == 0 and done < phase.steps:
                    _checkpoint(checkpoint_path, model, index, done, optimizer, aux_optimizer,
                                elapsed=time.time() - started, log_rows=log_rows)
            _checkpoint(checkpoint_path, model, index + 1, 0, None, None, elapsed=0.0, log_rows=log_rows)

    model.eval().cpu()
    model.latent.freeze()
    model_path = output / f"{config.name}.safetensors"
    save_model(model, model_path)
    return model_path


def _initial_model(config: TrainConfig) -> CorrDiffModel:
    """Fresh weights, or (``init``) a trained model's, to fine-tune it on new data or crops."""
    if config.init is None:
        return CorrDiffModel(config.model)
    model = load_model(resolve(config.init))
    if model.config != config.model:
        raise ValueError(f"init model {config.init!r} has a different architecture than the config's model: "
                         f"{model.config} != {config.model}")
    print(f"starting from the weights of {config.init}")
    return model


def _loss(model: CorrDiffModel, x: torch.Tensor, phase: PhaseConfig, config: TrainConfig, perceptual) -> PhaseLoss:
    if phase.phase == 0:
        return phase0_loss(model, x, config.lmbda, perceptual, phase.perceptual_weight, phase.train_latent)
    if phase.phase == 1:
        return phase1_loss(model, x)
    return phase2_loss(model, x, config.lmbda, perceptual, phase.perceptual_weight, phase.train_latent)


def _rewind_log(path: Path, rows: int | None) -> int:
    """Cut the log back to the checkpoint's ``rows`` rows, so that steps redone after a kill
    appear once and the log reads as one uninterrupted run; returns the rows kept. ``None``
    (a checkpoint written before checkpoints counted rows) keeps the whole log."""
    if rows == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return 0
    with open(path, newline="") as f:
        kept = list(csv.reader(f))
    kept = kept if rows is None else kept[:rows + 1]  # header + rows
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    return len(kept) - 1


def _checkpoint(path: Path, model: CorrDiffModel, phase_index: int, step: int,
                optimizer: torch.optim.Optimizer | None, aux_optimizer: torch.optim.Optimizer | None,
                elapsed: float, log_rows: int) -> None:
    """Write atomically: a kill mid-write leaves the previous checkpoint intact. ``elapsed``
    (seconds into the phase) and ``log_rows`` let a resumed run continue the log's clock and
    drop the rows of steps it redoes."""
    state = {"model": model.state_dict(), "phase_index": phase_index, "step": step,
             "optimizer": optimizer.state_dict() if optimizer else {},
             "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else {},
             "elapsed": elapsed, "log_rows": log_rows}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    main()
