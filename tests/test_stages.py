"""The stage contract (pipeline/stage.py): every stage declares it, and one helper runs it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

import pipeline.audit_stages
import pipeline.compress_stages
import pipeline.restore
import pipeline.restore_archive
from pipeline.resources import ResourceSettings, plan_resources
from pipeline.stage import ModelStage, Stage, TaskStage

STAGE_MODULES = (pipeline.compress_stages, pipeline.restore, pipeline.restore_archive, pipeline.audit_stages)


def _stages() -> list[type[Stage]]:
    """Every concrete stage class the pipelines run."""
    found, todo = [], [ModelStage, TaskStage]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ in {m.__name__ for m in STAGE_MODULES}:
            found.append(cls)
    return sorted(found, key=lambda cls: cls.__name__)


def test_every_stage_declares_its_name_kind_and_batches():
    stages = _stages()
    assert [s.name for s in stages] == ["CropWorst", "DecodeImages", "EncodeImages", "FetchOriginals",
                                        "RestoreRecords", "ScoreRecords", "WritePngs"]
    assert all(s.name == s.__name__ for s in stages)  # Ray's progress names the class the code names
    assert not any(s.__abstractmethods__ for s in stages)  # a model stage without its own lost() fails here
    plan = plan_resources(ResourceSettings(actor_batch_size=3, task_batch_size=11), {"CPU": 8.0, "GPU": 1.0})
    for stage in stages:
        resources = stage.resources(plan)
        if issubclass(stage, ModelStage):
            assert resources == plan.actor and resources.num_gpus == 0.5 and resources.batch_size == 3
        elif stage is pipeline.restore_archive.WritePngs:  # the restore stage's batches, on a task's CPU
            assert (resources.num_cpus, resources.num_gpus, resources.batch_size) == (0.5, 0.0, 3)
        else:
            assert resources == plan.tasks and resources.batch_size == 11
        assert stage.batch_format in ("pyarrow", "numpy")


def test_a_task_stage_runs_in_tasks_named_after_it(ray_local):
    """ResourcePlan.apply: the stage built from its settings in each task, Ray's operator
    named after it, its rows as the stage makes them (a bad image an error row)."""
    from pipeline.compress_stages import DecodeImages

    png = io.BytesIO()
    Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)).save(png, "PNG")
    rows = pa.table({"key": ["a", "b"], "source_uri": ["/a", "/b"], "data": [png.getvalue(), b"junk"],
                     "error": pa.array([None, None], pa.string())})
    plan = plan_resources(ResourceSettings(task_batch_size=1), ray.cluster_resources())
    dataset = plan.apply(ray.data.from_arrow(rows), DecodeImages, {"max_pixels": 100, "limits": plan.image_limits})
    assert "MapBatches(DecodeImages)" in str(dataset)
    out = sorted(dataset.take_all(), key=lambda row: row["key"])
    assert [row["error"] for row in out] == [None, "not a recognised image format"]
    assert np.array_equal(out[0]["pixels"], np.arange(18, dtype=np.uint8).reshape(2, 3, 3))

