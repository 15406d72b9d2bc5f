"""Finding the model a record names, by its id, wherever its weights are kept.

A record can be decoded only by the exact weights that wrote it, and it names them by id
(:func:`corrdiff.weights.model_id`), not by a file name that may change. The weights may be
kept in several places: beside the archive the record lives in, in this package (the
models it recommends), in a shared store. A :class:`ModelLibrary` asks its sources in
order and verifies what it gets: a file that is not the model asked for is refused, never
used, and the search goes on; a model found nowhere raises :class:`ModelNotFoundError`
naming every place searched and every file refused.

Sources are anything with a ``location`` and a ``read(model_id)``: this package knows
nothing of storage, so the archive's ``_models/`` folder and fsspec stores are sources that
``pipeline.models`` defines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from corrdiff import weights
from corrdiff.codec import CorrDiffCodec, DecodeMode, check_decode_mode
from corrdiff.record import Record

log = logging.getLogger(__name__)

class WeightsSource(Protocol):
    """A place that may hold weights files, looked up by model id."""

    @property
    def location(self) -> str:
        """Where it is, as said in messages (e.g. ``s3://bucket/archive/_models``)."""
        ...

    def read(self, model_id: str) -> bytes | None:
        """The bytes of its file for this model id, or None if it has none (errors raise)."""
        ...


class BundledModels:
    """The models this package ships (``corrdiff/pretrained``)."""

    location = "the corrdiff package"

    def read(self, model_id: str) -> bytes | None:
        path = weights.bundled_model(model_id)
        return None if path is None else weights.read_weights(path)


class ModelNotFoundError(LookupError):
    """No source holds a usable copy of a model: says where it looked and what it refused."""

    def __init__(self, model_id: str, searched: Sequence[str], refused: Sequence[str] = ()) -> None:
        message = f"model {model_id} was found nowhere; searched: {'; '.join(searched) or 'no places'}"
        if refused:
            message += f"; refused: {'; '.join(refused)}"
        super().__init__(message)
        self.model_id, self.searched, self.refused = model_id, tuple(searched), tuple(refused)


@dataclass(frozen=True)
class FoundModel:
    codec: CorrDiffCodec
    location: str  # the source it came from
    refused: tuple[str, ...] = ()  # copies met earlier in the search and refused, with why


class ModelLibrary:
    """Models by id from ordered sources, each loaded once (and each miss looked up once)."""

    def __init__(self, sources: Sequence[WeightsSource], device: str | torch.device | None = None) -> None:
        self.sources = tuple(sources)
        self.device = device
        self._found: dict[str, FoundModel | ModelNotFoundError] = {}

    def find(self, model_id: str) -> FoundModel:
        """The model with this id and where it was found; raises :class:`ModelNotFoundError`."""
        if model_id not in self._found:
            self._found[model_id] = self._search(model_id)
        found = self._found[model_id]
        if isinstance(found, ModelNotFoundError):
            raise found
        return found

    def codec(self, model_id: str) -> CorrDiffCodec:
        return self.find(model_id).codec

    def decode(self, records: Sequence[bytes], mode: DecodeMode = "corrdiff",
               steps: int | None = None) -> list[np.ndarray]:
        """Decode records of any models, each by the model whose id it carries.

        Raises ``RecordError`` for a corrupt record and :class:`ModelNotFoundError` for one
        whose model no source has.
        """
        check_decode_mode(mode)
        return [self.codec(Record.from_bytes(record).model_id.hex()).decode([record], mode=mode, steps=steps)[0]
                for record in records]

    def _search(self, model_id: str) -> FoundModel | ModelNotFoundError:
        if not weights.is_model_id(model_id):
            return ModelNotFoundError(model_id, [], [f"{model_id!r} is not a model id"])
        refused = []
        for source in self.sources:
            try:
                data = source.read(model_id)
                if data is None:
                    continue
                model = weights.model_from_bytes(data, f"{source.location}: {model_id}", expected_id=model_id)
            except weights.WeightsError as error:
                refused.append(str(error))
                continue
            except OSError as error:
                refused.append(f"{source.location} could not be read: {type(error).__name__}: {error}")
                continue
            for reason in refused:
                log.warning("refused a copy of model %s (used the one in %s): %s", model_id, source.location, reason)
            return FoundModel(CorrDiffCodec(model, device=self.device), source.location, tuple(refused))
        return ModelNotFoundError(model_id, [s.location for s in self.sources], refused)
