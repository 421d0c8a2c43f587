"""What a prepared call read, so that a replay can tell whether it would still compute the same."""
from __future__ import annotations

from typing import Iterable, List

import torch


class StateWatch:
    """Entries (a module's attribute dict, key) with the object each held when watched, the version
    counter of every tensor among them (in-place updates — an optimizer step, load_state_dict,
    copy_ under no_grad — bump it; writes through `.data` do not), containers that must stay empty
    (hook dicts) and objects that must keep their class.

    unchanged() runs in C (lwkernels._C.StateSnapshot): a whole model's replay checks about a
    thousand entries per call, cold in the caches after the kernels ran. The snapshot borrows the
    objects in this watch's lists, so it is dropped whenever they change."""

    __slots__ = ("_dicts", "_keys", "_values", "_tensors", "_versions", "_empty", "_objects", "_types",
                 "_snapshot")

    def __init__(self) -> None:
        self._dicts: List[dict] = []
        self._keys: List[str] = []
        self._values: List[object] = []
        self._tensors: List[torch.Tensor] = []
        self._versions: List[int] = []
        self._empty: List[object] = []
        self._objects: List[object] = []
        self._types: List[type] = []
        self._snapshot = None

    def watch(self, d, keys: Iterable[str]) -> bool:
        """Watches d[key] for each key (absent keys as None; `d` a dict or a class's __dict__);
        False when one is an inference tensor, which has no version counter, so changes to it would
        go unseen."""
        self._snapshot = None
        for key in keys:
            value = d.get(key)
            self._dicts.append(d)
            self._keys.append(key)
            self._values.append(value)
            if isinstance(value, torch.Tensor):
                if value.is_inference():
                    return False
                self._tensors.append(value)
                self._versions.append(value._version)
        return True

    def watch_empty(self, container) -> None:
        """`container` (a module's hook dict) must stay empty."""
        self._snapshot = None
        self._empty.append(container)

    def watch_class(self, obj) -> None:
        """`obj` must keep its class."""
        self._snapshot = None
        self._objects.append(obj)
        self._types.append(type(obj))

    @classmethod
    def union(cls, watches: Iterable["StateWatch"]) -> "StateWatch":
        """One watch over everything `watches` watch, each entry once, checked in one pass."""
        merged = cls()
        seen = set()

        def add(key, columns, items) -> None:
            if key not in seen:
                seen.add(key)
                for column, item in zip(columns, items):
                    column.append(item)

        for w in watches:
            for d, k, v in zip(w._dicts, w._keys, w._values):  # (a stale duplicate stays: it fails)
                add(("entry", id(d), k, id(v)), (merged._dicts, merged._keys, merged._values), (d, k, v))
            for t, version in zip(w._tensors, w._versions):
                add(("tensor", id(t), version), (merged._tensors, merged._versions), (t, version))
            for c in w._empty:
                add(("empty", id(c)), (merged._empty,), (c,))
            for o, kind in zip(w._objects, w._types):
                add(("class", id(o), kind), (merged._objects, merged._types), (o, kind))
        return merged

    def unchanged(self) -> bool:
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = self._native_snapshot()
        return snapshot.unchanged()

    def _native_snapshot(self):
        from .backend import native

        return native().StateSnapshot(self._dicts, self._keys, self._values, self._tensors, self._versions,
                                      self._empty, self._objects, self._types)

    def requires_grad(self) -> bool:
        """True when a watched tensor requires grad (a call that autograd must record)."""
        return any(t.requires_grad for t in self._tensors)
