"""What a prepared call read, so that a replay can tell whether it would still compute the same."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch


class StateWatch:
    """Entries (a module's attribute dict, key) with the object each held when watched, and the
    version counter of every tensor among them (in-place updates — an optimizer step,
    load_state_dict, copy_ under no_grad — bump it; writes through `.data` do not)."""

    __slots__ = ("_same", "_versions")

    def __init__(self) -> None:
        self._same: List[Tuple[dict, str, object]] = []
        self._versions: List[Tuple[torch.Tensor, int]] = []

    def watch(self, d: dict, keys: Iterable[str]) -> bool:
        """Watches d[key] for each key (absent keys as None); False when one is an inference tensor,
        which has no version counter, so changes to it would go unseen."""
        for key in keys:
            value = d.get(key)
            self._same.append((d, key, value))
            if isinstance(value, torch.Tensor):
                if value.is_inference():
                    return False
                self._versions.append((value, value._version))
        return True

    @classmethod
    def union(cls, watches: Iterable["StateWatch"]) -> "StateWatch":
        """One watch over everything `watches` watch, checked in one pass."""
        merged = cls()
        for w in watches:
            merged._same.extend(w._same)
            merged._versions.extend(w._versions)
        return merged

    def unchanged(self) -> bool:
        for d, key, value in self._same:
            if d.get(key) is not value:
                return False
        for t, version in self._versions:
            if t._version != version:
                return False
        return True

    def requires_grad(self) -> bool:
        """True when a watched tensor requires grad (a call that autograd must record)."""
        return any(t.requires_grad for t, _ in self._versions)
