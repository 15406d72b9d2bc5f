"""The contract every pipeline stage follows (NeMo Curator's stage contract, on Ray Data).

A stage is a class that declares, on itself, what a reader of a pipeline needs to know:

* ``name``: what Ray Data's progress and the logs call its operator (``MapBatches(name)``);
* its resources and batch size, by what it derives from: a :class:`ModelStage` holds a
  model and runs in a pool of actors (GPUs where the cluster has them, each actor running
  the stage in a child process: pipeline.isolation), a :class:`TaskStage` holds nothing
  heavy and runs in CPU tasks. The numbers themselves depend on the cluster and the job's
  ``resources`` settings, so :meth:`Stage.resources` derives them from the job's
  :class:`~pipeline.resources.ResourcePlan`; a stage whose rows are unlike its kind's says
  so by overriding it (PNG writing takes the model stage's batches as they come);
* ``batch_format``: what its ``__call__`` receives.

Its constructor takes its settings as keyword arguments and calls :meth:`Stage.setup`,
which loads anything heavy once per worker (a model actor keeps its stage for the whole
job; a task stage is built for each batch, and so has nothing heavy to load). ``__call__``
maps a batch of rows to a batch of rows and never raises for one bad row: that row becomes
a row with an ``error``, because Ray Data drops a whole block when a UDF raises. A model
stage also says, without its model, what a batch's rows become when processing them killed
its worker process (:meth:`ModelStage.lost`).

One function turns a stage into its ``map_batches`` call:
:meth:`pipeline.resources.ResourcePlan.apply`. This module imports neither Ray nor torch:
a model stage's child process imports its stage's module, and nothing more than it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:
    from pipeline.resources import ResourcePlan, StageResources


class Stage(ABC):
    """A pipeline stage (see the module)."""

    name: ClassVar[str]
    batch_format: ClassVar[str] = "pyarrow"

    def setup(self) -> None:
        """Load what the stage needs once per worker; nothing, unless a stage says otherwise."""

    @abstractmethod
    def __call__(self, batch: Any) -> pa.Table:
        """The output rows for a batch of input rows; a row that fails becomes an error row."""

    @classmethod
    @abstractmethod
    def resources(cls, plan: ResourcePlan) -> StageResources:
        """What one worker of this stage asks Ray for, and how many rows it takes at a time."""


class ModelStage(Stage):
    """A stage that holds a model: a pool of ``plan.actors`` actors of ``plan.actor``'s
    CPUs, GPUs and batch size, each running the stage in a child process under
    ``plan.limits`` (pipeline.isolation)."""

    @classmethod
    def resources(cls, plan: ResourcePlan) -> StageResources:
        return plan.actor

    @classmethod
    @abstractmethod
    def lost(cls, batch: Any, reason: str, settings: dict[str, Any]) -> pa.Table:
        """The output rows for ``batch`` when its worker died processing it (no model needed)."""


class TaskStage(Stage):
    """A stage that holds no model: stateless CPU tasks of ``plan.tasks``' CPUs and batch
    size, each retried a bounded number of times when its worker dies."""

    @classmethod
    def resources(cls, plan: ResourcePlan) -> StageResources:
        return plan.tasks
