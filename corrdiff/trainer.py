"""The training loop: a CorrDiff model through its three phases, resumably, then exported.

Phases (corrdiff/training.py): 0 latent codec + D (or D alone, ``train_latent: false``,
optionally with an LPIPS term), 1 score network, 2 perceptual fine-tuning. A phase with the
codec frozen first refreshes its tables (``LatentCodec.freeze``): its losses code the
latent exactly as records do. Every ``checkpoint_every`` steps the whole state goes to
``OUTPUT/checkpoint.pt``; running the same config again resumes from it. Losses, bpp and
PSNR go to ``OUTPUT/log.csv``, one row per logged step even across kills and resumes, with
the seconds spent in the phase so far. At the end the model is frozen (CDF tables, fixed-point
hyper-synthesis) and written to ``OUTPUT/<name>.safetensors``. Runs on CUDA when present.

For a run against a wall clock (a lent GPU: docs/training.md, scripts/device_train.sh):
``max_seconds`` splits the time left after loading between the phases by their
``fraction`` (each phase's ``steps`` is then a cap) and ends in time to export;
``lr_final`` anneals a phase's learning rate over its steps or its time, whichever runs
out first; ``checkpoint_seconds`` checkpoints by the clock as well as every
``checkpoint_every`` steps, ``export_checkpoints`` writes the loadable model at each
checkpoint too, and ``max_file_mib`` keeps every file at most that large (the optimizer's
state in shards); ``precision: bf16`` autocasts the score network and a training D;
``crops_on_device`` cuts the crops on the GPU; ``lpips: optional`` skips the phases that
need LPIPS, saying so, where it cannot be loaded, instead of failing.

Plain PyTorch: the photos come from the caller (``pipeline.train.run_train`` reads them from
storage with ``pipeline.image_folder``), and progress goes to the ``corrdiff.trainer`` logger
(and a tqdm bar per phase, in a terminal).
"""

from __future__ import annotations

import csv
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corrdiff.codec import pick_device
from corrdiff.config import ModelConfig
from corrdiff.gamma import perceptual_loss
from corrdiff.latent_codec import HYPER_STRIDE
from corrdiff.model import CorrDiffModel
from corrdiff.train_runtime import (CheckpointStore, DeviceCrops, RandomCrops, cosine_lr, export_snapshot,
                                   memory_gib, optional_lpips, phase_ends)
from corrdiff.training import PhaseLoss, phase0_loss, phase1_loss, phase2_loss, trainable_parameters
from corrdiff.weights import load_model, load_state, resolve

log = logging.getLogger(__name__)

# Crops below 4 hyper-latent positions a side leave z almost all border: h_s then learns the
# zero padding's statistics and mispredicts the interior of every larger image, whose rate
# comes out several times too high (docs/model-history.md, "Crop size and the hyperprior").
MIN_CROP = 4 * HYPER_STRIDE
LOG_COLUMNS = ["phase", "step", "seconds", "lr", "loss", "bpp", "mse", "psnr", "e2e_psnr", "lpips", "gamma",
               "steps_per_s", "gpu_mem_gib"]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class PhaseConfig:
    phase: int
    steps: int
    lr: float
    perceptual_weight: float = 0.0  # phases 0 (on D's output) and 2 (on the corrected estimate)
    train_latent: bool = True  # phases 0 and 2: false trains D / the score network alone, the rate stays put
    fraction: float | None = None  # share of max_seconds (normalised over the phases); steps is then a cap
    lr_final: float | None = None  # anneal lr to this along a half cosine over the phase (steps or time)

    def __post_init__(self) -> None:
        if self.phase not in (0, 1, 2):
            raise ValueError(f"unknown training phase {self.phase}")
        if self.phase == 1 and (self.perceptual_weight or not self.train_latent):
            raise ValueError("phase 1 trains the score network alone on the diffusion loss: "
                             "perceptual_weight and train_latent apply to phases 0 and 2")
        if self.fraction is not None and self.fraction <= 0:
            raise ValueError(f"a phase's fraction must be positive, got {self.fraction}")

    @property
    def needs_lpips(self) -> bool:
        return self.phase == 2 or self.perceptual_weight > 0


@dataclass
class TrainConfig:
    """One training run, as its YAML config (configs/train/) gives it
    (``corrdiff.typed_config.load_config(TrainConfig, path, flags)``)."""

    name: str
    data: str  # URL of the photos, which the caller reads (with storage_options) for load_images
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
    max_seconds: float | None = None  # wall-clock budget of the whole run, from start to export
    checkpoint_seconds: float | None = None  # also checkpoint when this long has passed since the last
    export_checkpoints: bool = False  # write the loadable <name>.safetensors at every checkpoint too
    max_file_mib: float | None = None  # no file in the output larger (the optimizer state goes in shards)
    precision: str = "fp32"  # or bf16: autocast on the score network and a training D (corrdiff/training.py)
    crops_on_device: bool = False  # cut the crops on the training device (train_runtime.DeviceCrops)
    lpips: str = "required"  # or optional: skip the phases that need it where it cannot be loaded

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lpips not in ("required", "optional"):
            raise ValueError(f"lpips must be required or optional, got {self.lpips!r}")
        given = [p.fraction is not None for p in self.phases]
        if any(given) and not all(given):
            raise ValueError("give every phase a fraction, or none (then the budget is split by steps)")
        if self.crop < MIN_CROP:
            warnings.warn(f"{self.crop} px crops give a hyper-latent of {-(-self.crop // HYPER_STRIDE)}x"
                          f"{-(-self.crop // HYPER_STRIDE)}, all border: the model will mispredict the rate of "
                          f"larger images; use crops of at least {MIN_CROP} px", stacklevel=3)


def train(config: TrainConfig, load_images: Callable[[], Sequence[np.ndarray]]) -> Path:
    """Train (or resume) the run that ``config`` describes; returns the exported model's path.

    ``load_images`` gives the training photos (HxWx3 uint8, each at least ``config.crop``
    a side); it is called once the model is ready, inside the run's clock, so that a
    ``max_seconds`` budget counts the loading.
    """
    clock = time.monotonic()
    deadline = clock + config.max_seconds if config.max_seconds else None
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(None if config.device == "auto" else config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one crop size throughout: let cuDNN time its kernels once
    amp = PRECISIONS[config.precision]
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    max_bytes = int(config.max_file_mib * 2**20) if config.max_file_mib else None
    store = CheckpointStore(output, max_bytes)
    model_path = output / f"{config.name}.safetensors"

    torch.manual_seed(config.seed)
    model = _initial_model(config).to(device)
    start_phase, start_step, saved = 0, 0, store.load(device)
    if saved is not None:
        load_state(model, saved["model"])
        start_phase, start_step = saved["phase_index"], saved["step"]
        log.info(f"resuming from {store.path}: phase index {start_phase}, step {start_step}")
    export_seconds = _check_export(model, store, max_bytes) if (max_bytes or deadline or config.export_checkpoints) else 0.0

    loaded = time.monotonic()
    images = list(load_images())
    log.info(f"{len(images)} training images, {sum(im.shape[0] * im.shape[1] for im in images) / 1e6:.1f} Mpx "
          f"(loaded in {time.monotonic() - loaded:.1f} s)")
    lpips_metric, skipped = _lpips(config, device, start_phase)
    perceptual = perceptual_loss(lpips_metric) if lpips_metric is not None else None
    ends = _phase_ends(config, start_phase, skipped, deadline, export_seconds)
    crops = (DeviceCrops(images, config.crop, 0, config.min_scale, device) if config.crops_on_device
             else None)

    log_rows = _rewind_log(output / "log.csv", saved.get("log_rows") if saved else 0)
    columns = _log_header(output / "log.csv") or LOG_COLUMNS

    def checkpoint(phase_index: int, step: int, optimizer, aux_optimizer, elapsed: float) -> None:
        if config.export_checkpoints:
            export_snapshot(model, model_path)
        state = {"model": model.state_dict(), "phase_index": phase_index, "step": step,
                 "optimizer": optimizer.state_dict() if optimizer else {},
                 "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else {},
                 "elapsed": elapsed, "log_rows": log_rows}
        store.save(state)

    with open(output / "log.csv", "a", newline="") as log_file:
        rows = csv.DictWriter(log_file, columns, extrasaction="ignore")
        if log_file.tell() == 0:
            rows.writeheader()

        def write_row(row: dict) -> None:
            nonlocal log_rows
            rows.writerow(row)
            log_file.flush()
            log_rows += 1
            log.info(" ".join(f"{k}={v}" for k, v in row.items()))

        for index in range(start_phase, len(config.phases)):
            phase = config.phases[index]
            if index in skipped:
                log.info(f"phase index {index} (phase {phase.phase}) skipped: it needs LPIPS, which is not available here")
                checkpoint(index + 1, 0, None, None, elapsed=0.0)
                continue
            first = start_step if index == start_phase else 0
            seed = config.seed * 1_000_003 + index * 10_007 + first
            phase_crops = (crops.reseed(seed) if crops is not None
                           else RandomCrops(images, config.crop, seed=seed, min_scale=config.min_scale))
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
            resumed = saved.get("elapsed", 0.0) if saved is not None and index == start_phase else 0.0
            started = time.monotonic() - resumed
            end = ends.get(index)
            last_checkpoint = interval_start = time.monotonic()
            interval_steps, done, logged = 0, first, first

            def row_of(result: PhaseLoss, x: torch.Tensor, lr: float) -> dict:
                nonlocal interval_start, interval_steps
                now = time.monotonic()
                row = {"phase": phase.phase, "step": done, "seconds": round(now - started, 1), "lr": _round(lr),
                       "loss": round(result.loss.item(), 5), **{k: round(v, 5) for k, v in result.metrics.items()}}
                if "lpips" not in row and lpips_metric is not None and result.reconstruction is not None:
                    with torch.no_grad():
                        distance = lpips_metric.distance(lpips_metric.features(result.reconstruction),
                                                         lpips_metric.features(x * 2 - 1))
                    row["lpips"] = round(distance.mean().item(), 5)
                if interval_steps and now > interval_start:
                    row["steps_per_s"] = round(interval_steps / (now - interval_start), 3)
                memory = memory_gib(device)
                if memory is not None:
                    row["gpu_mem_gib"] = round(memory, 2)
                interval_start, interval_steps = time.monotonic(), 0
                return row

            lr, step_seconds = phase.lr, 0.0  # step_seconds: a running mean of one step's time
            # A bar in a terminal only (disable=None): a log gets the logged rows instead.
            bar = tqdm(range(first, phase.steps), desc=f"phase index {index} (phase {phase.phase})", unit="step",
                       initial=first, total=phase.steps, disable=None, leave=False)
            for step in bar:
                now = time.monotonic()
                if end is not None and now + step_seconds >= end:  # stop rather than run past the end
                    log.info(f"phase index {index} (phase {phase.phase}): its time is up after step {done} of {phase.steps}")
                    break
                progress = step / phase.steps
                if end is not None:
                    progress = max(progress, (now - started) / max(end - started, 1e-9))
                lr = cosine_lr(phase.lr, phase.lr_final, progress)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                done = step + 1
                measure = done % config.log_every == 0 or done == phase.steps
                x = phase_crops.batch(config.batch_size).to(device, non_blocking=True)
                result = _loss(model, x, phase, config, perceptual, amp, measure)
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                torch.nn.utils.clip_grad_norm_(main_params, 1.0)
                optimizer.step()
                if aux_optimizer is not None and result.aux_loss is not None:
                    aux_optimizer.zero_grad(set_to_none=True)
                    result.aux_loss.backward()
                    aux_optimizer.step()
                interval_steps += 1
                took = time.monotonic() - now
                step_seconds = took if step == first else 0.8 * step_seconds + 0.2 * took
                if measure:
                    write_row(row_of(result, x, lr))
                    bar.set_postfix(loss=round(result.loss.item(), 5), refresh=False)
                    logged = done
                by_clock = config.checkpoint_seconds and time.monotonic() - last_checkpoint >= config.checkpoint_seconds
                if (done % config.checkpoint_every == 0 or by_clock) and done < phase.steps:
                    checkpoint(index, done, optimizer, aux_optimizer, elapsed=time.monotonic() - started)
                    last_checkpoint = time.monotonic()
            bar.close()
            if done > logged:  # stopped by the clock between two logged steps: measure where it ended
                x = phase_crops.batch(config.batch_size).to(device, non_blocking=True)
                with torch.no_grad():
                    write_row(row_of(_loss(model, x, phase, config, perceptual, amp, True), x, lr))
            checkpoint(index + 1, 0, None, None, elapsed=0.0)

    model.eval()
    export_snapshot(model, model_path)
    log.info(f"trained for {time.monotonic() - clock:.1f} s in all")
    return model_path


def _check_export(model: CorrDiffModel, store: CheckpointStore, max_bytes: int | None) -> float:
    """Export once before training, to a scratch folder: the seconds it takes (the budget
    keeps that much at the end), and a refusal now, not after the run, if the model or its
    checkpoint would be larger than a file may be."""
    import tempfile

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corrdiff-export-") as scratch:
        size = export_snapshot(model, Path(scratch) / "model.safetensors").stat().st_size
    seconds = time.monotonic() - started
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"the exported model takes {size / 2**20:.2f} MiB, more than the {max_bytes / 2**20:.2f} MiB "
                         "a file may have: use a smaller model")
    store.check_model_bytes(size)
    log.info(f"exported model: {size / 2**20:.2f} MiB, {seconds:.1f} s to write")
    return seconds


def _lpips(config: TrainConfig, device: torch.device, start_phase: int):
    """LPIPS-alex (or None) and the phase indexes skipped for the want of it."""
    needs = [i for i in range(start_phase, len(config.phases)) if config.phases[i].needs_lpips]
    metric, why = optional_lpips(device)
    if metric is not None:
        return metric, set()
    if needs and config.lpips == "required":
        raise RuntimeError(f"phase index(es) {needs} need LPIPS-alex, which cannot be loaded ({why}); "
                           "run scripts/install_lpips_weights.py, or pass --lpips optional to skip those phases")
    if needs:
        log.warning(f"LPIPS-alex not available ({why}): phase index(es) {needs} will be SKIPPED, their time given to "
              "the others, and no LPIPS is logged")
    else:
        log.info(f"LPIPS-alex not available ({why}): the log has no lpips column values")
    return None, set(needs)


def _phase_ends(config: TrainConfig, start_phase: int, skipped: set[int], deadline: float | None,
                export_seconds: float) -> dict[int, float]:
    """Each phase's stopping time under ``max_seconds`` (none without it): the time left now,
    less a reserve for the checkpoints and export at the end, cut by the phases' fractions
    (by their steps where no fraction is given)."""
    if deadline is None:
        return {}
    run = [i for i in range(start_phase, len(config.phases)) if i not in skipped]
    now = time.monotonic()
    stop = max(now, deadline - (2.0 + 3.0 * export_seconds))
    shares = [config.phases[i].fraction or config.phases[i].steps for i in run]
    ends = dict(zip(run, phase_ends(now, stop, shares)))
    log.info("time budget: " + ", ".join(f"phase index {i} (phase {config.phases[i].phase}) until "
                                       f"+{ends[i] - now:.0f} s" for i in run) + f"; export by +{deadline - now:.0f} s")
    return ends


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _initial_model(config: TrainConfig) -> CorrDiffModel:
    """Fresh weights, or (``init``) a trained model's, to fine-tune it on new data or crops."""
    if config.init is None:
        return CorrDiffModel(config.model)
    model = load_model(resolve(config.init))
    if model.config != config.model:
        raise ValueError(f"init model {config.init!r} has a different architecture than the config's model: "
                         f"{model.config} != {config.model}")
    log.info(f"starting from the weights of {config.init}")
    return model


def _loss(model: CorrDiffModel, x: torch.Tensor, phase: PhaseConfig, config: TrainConfig, perceptual,
          amp: torch.dtype | None = None, measure: bool = True) -> PhaseLoss:
    if phase.phase == 0:
        return phase0_loss(model, x, config.lmbda, perceptual, phase.perceptual_weight, phase.train_latent,
                           amp=amp, measure=measure)
    if phase.phase == 1:
        return phase1_loss(model, x, amp=amp, measure=measure)
    return phase2_loss(model, x, config.lmbda, perceptual, phase.perceptual_weight, phase.train_latent,
                       amp=amp, measure=measure)


def _log_header(path: Path) -> list[str] | None:
    """The columns of an existing log (an older run's may have fewer): rows resume under them."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


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

