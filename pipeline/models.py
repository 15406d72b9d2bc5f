"""Models kept with the data: the archive's own ``_models/`` folder, and model stores.

A record decodes only with the exact weights that wrote it, so an archive keeps them:
the compress job writes ``ARCHIVE/_models/<model id>.safetensors`` for the model its
records use, once, before any record of it (Parquet readers ignore ``_`` folders). An
archive then restores with no package version and no store beside it, years later.

Every job finds a record's model in one way, through :class:`ModelSources`: the archive's
``_models/``, then the models bundled with the package, then the stores the user names
(fsspec prefixes holding ``<model id>.safetensors``, e.g. a shared ``s3://…/models/``).
What a source returns is verified (``corrdiff.library``): a file whose recomputed id is
not its name is refused, never used.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corrdiff.library import BundledModels, ModelLibrary, ModelNotFoundError, WeightsSource
from corrdiff.weights import (WEIGHTS_SUFFIX, WeightsError, check_weights_size, is_model_id,
                              model_from_bytes)

from pipeline.archive import TEMP_PREFIX
from pipeline.storage import StorageConfig, filesystem, with_retries

MODELS_DIR = "_models"
# What store_model did: wrote the file, found a good copy, or replaced a damaged one.
WRITTEN, PRESENT, REPLACED = "written", "present", "replaced"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredModels:
    """An fsspec prefix of weights files named ``<model id>.safetensors`` (a WeightsSource)."""

    url: str
    storage: StorageConfig

    @property
    def location(self) -> str:
        return self.url.rstrip("/")

    def path(self, model_id: str) -> str:
        return posixpath.join(self.location, model_id + WEIGHTS_SUFFIX)

    def read(self, model_id: str) -> bytes | None:
        if not is_model_id(model_id):  # never a path built from anything but 32 hex digits
            raise WeightsError(f"{model_id!r} is not a model id")
        fs, path = filesystem(self.path(model_id), self.storage)
        fs.invalidate_cache(posixpath.dirname(path))  # a file another process wrote must not look absent
        try:
            size = with_retries(lambda: fs.size(path), self.storage, f"stat {self.path(model_id)}")
        except FileNotFoundError:
            return None
        check_weights_size(size, self.path(model_id))
        return with_retries(lambda: fs.cat_file(path), self.storage, f"read {self.path(model_id)}")


def archive_store(archive: str, storage: StorageConfig) -> StoredModels:
    """The archive's own ``_models/`` folder."""
    return StoredModels(posixpath.join(archive.rstrip("/"), MODELS_DIR), storage)


@dataclass(frozen=True)
class ModelSources:
    """Where a job looks for models, in order: the archive's ``_models/`` (if an archive is
    given), the package's bundled models, then ``stores``. Small and picklable: it travels
    to every actor, which builds its own :class:`~corrdiff.library.ModelLibrary`."""

    archive: str | None
    storage: StorageConfig
    stores: tuple[str, ...] = ()

    def sources(self) -> list[WeightsSource]:
        own = [archive_store(self.archive, self.storage)] if self.archive else []
        return [*own, BundledModels(), *(StoredModels(url, self.storage) for url in self.stores)]

    def library(self, device: str | None = None) -> ModelLibrary:
        return ModelLibrary(self.sources(), device=device)


def archive_models(archive: str, storage: StorageConfig | None = None, stores: Sequence[str] = (),
                   device: str | None = None) -> ModelLibrary:
    """The Python API's way in: every model an archive's records may need, found by id.

        models = archive_models("s3://bucket/archive/")
        [image] = models.decode([record])          # by the model the record names
    """
    return ModelSources(archive, storage or StorageConfig(), tuple(stores)).library(device)


def store_model(archive: str, storage: StorageConfig, model_id: str, data: bytes) -> str:
    """Keep a model's weights file in the archive: :data:`WRITTEN`, :data:`PRESENT` (an existing
    copy verified, not rewritten) or :data:`REPLACED` (an existing copy failed verification).

    ``data`` must already be verified as model ``model_id``. The file appears under its
    final name only when complete (written under a hidden name, then renamed).
    """
    store = archive_store(archive, storage)
    status = WRITTEN
    try:
        existing = store.read(model_id)
        if existing is not None:
            model_from_bytes(existing, store.path(model_id), expected_id=model_id)
            return PRESENT
    except WeightsError as error:
        log.warning("replacing a damaged copy of model %s in the archive: %s", model_id, error)
        status = REPLACED
    fs, final = filesystem(store.path(model_id), storage)
    temp = posixpath.join(posixpath.dirname(final), f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{posixpath.basename(final)}")
    with_retries(lambda: fs.makedirs(posixpath.dirname(final), exist_ok=True), storage, f"mkdir {store.location}")
    with_retries(lambda: fs.pipe_file(temp, data), storage, f"write {temp}")
    with_retries(lambda: fs.mv(temp, final), storage, f"rename {temp}")
    return status


@dataclass(frozen=True)
class StoredModelCheck:
    """One file of an archive's ``_models/`` and, if it is not the model its name says, why."""

    path: str
    error: str | None = None


def check_stored_models(archive: str, storage: StorageConfig) -> list[StoredModelCheck]:
    """Verify every weights file in the archive's ``_models/``: its name is a model id and its
    recomputed id is that one. A damaged file is a finding (the verify job counts it)."""
    store = archive_store(archive, storage)
    fs, root = filesystem(store.location, storage)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    checks = []
    for path in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(path)
        if name.startswith(TEMP_PREFIX):
            continue
        model_id = name.removesuffix(WEIGHTS_SUFFIX)
        full = posixpath.join(store.location, name)
        try:
            if not name.endswith(WEIGHTS_SUFFIX) or not is_model_id(model_id):
                raise WeightsError(f"{full} is not named <model id>{WEIGHTS_SUFFIX}")
            data = store.read(model_id)
            if data is None:
                raise WeightsError(f"{full} vanished while it was checked")
            model_from_bytes(data, full, expected_id=model_id)
            checks.append(StoredModelCheck(full))
        except (WeightsError, OSError) as error:
            checks.append(StoredModelCheck(full, str(error)))
    return checks


def model_locations(model_ids: Iterable[str | None], sources: ModelSources) -> dict[str, str | None]:
    """Each model id met -> where its verified weights were found (None: nowhere)."""
    library = sources.library(device="cpu")
    locations: dict[str, str | None] = {}
    for model_id in sorted({m for m in model_ids if m}):
        try:
            locations[model_id] = library.find(model_id).location
        except ModelNotFoundError:
            locations[model_id] = None
    return locations
