"""A Kedro dataset that stores one intermediate as a kvx blob in a :class:`BlobStore`."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset

from kvx_runtime.storage.store import BlobStore

__all__ = ["BlobDataset"]


class BlobDataset(AbstractDataset[Any, Any]):
    """Intermediate data crossing a step boundary.

    Errors raised here are kvx-runtime errors (subclasses of ``KvxError``), which the executor
    finds in Kedro's wrapped exceptions to report a missing or corrupt blob as such.
    """

    def __init__(self, name: str, store: BlobStore, *, producer: str | None = None) -> None:
        self._name = name
        self._store = store
        self._producer = producer

    def load(self) -> Any:
        return self._store.load(self._name, producer=self._producer)

    def save(self, data: Any) -> None:
        self._store.save(self._name, data)

    def _exists(self) -> bool:
        return self._store.exists(self._name)

    def _describe(self) -> dict[str, Any]:
        return {"path": self._store.url(self._name), "producer": self._producer}
