"""StateWatch (cpu/state_watch.py, checked in C): every kind of entry notices its change."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lwkernels.cpu.state_watch import StateWatch


class _Holder(nn.Module):
    def forward(self, x):
        return x


def _watched():
    module = _Holder()
    module.register_buffer("buf", torch.zeros(3))
    module.scale = 2.0
    watch = StateWatch()
    assert watch.watch(module._buffers, ("buf", "missing"))
    assert watch.watch(module.__dict__, ("scale", "forward"))
    assert watch.watch(type(module).__dict__, ("forward",))
    watch.watch_empty(module._forward_hooks)
    watch.watch_class(module)
    return module, watch


def _add_hook(m):
    m.register_forward_hook(lambda *a: None)


def _swap_class(m):
    m.__class__ = type("Other", (_Holder,), {})


def _patch_class_forward(m):
    type(m).forward = lambda self, x: x + 1


CHANGES = {
    "tensor updated in place": lambda m: m.buf.add_(1),
    "tensor replaced": lambda m: setattr(m, "buf", torch.zeros(3)),
    "absent key set": lambda m: m._buffers.__setitem__("missing", torch.zeros(1)),
    "attribute rebound (equal value, other object)": lambda m: setattr(m, "scale", float("2.0")),
    "forward set on the instance": lambda m: setattr(m, "forward", lambda x: x),
    "hook added": _add_hook,
    "class swapped": _swap_class,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_is_seen(change):
    module, watch = _watched()
    assert watch.unchanged()
    CHANGES[change](module)
    assert not watch.unchanged()


def test_a_class_attribute_is_watched_through_its_mappingproxy():
    cls = type("Local", (_Holder,), {"forward": lambda self, x: x})
    watch = StateWatch()
    watch.watch(cls.__dict__, ("forward",))
    assert watch.unchanged()
    cls.forward = lambda self, x: x * 2
    assert not watch.unchanged()


def test_union_watches_everything_its_parts_watch():
    (a, wa), (b, wb) = _watched(), _watched()
    both = StateWatch.union([wa, wb])
    assert both.unchanged()
    b.buf.add_(1)
    assert not both.unchanged() and wa.unchanged()


def test_an_inference_tensor_cannot_be_watched():
    with torch.inference_mode():
        t = torch.zeros(2)
    assert not StateWatch().watch({"t": t}, ("t",))


def test_union_keeps_an_entry_watched_with_another_value():
    d = {"k": 1.5}
    first = StateWatch()
    first.watch(d, ("k",))
    d["k"] = 2.5
    second = StateWatch()
    second.watch(d, ("k",))
    assert not first.unchanged() and second.unchanged()
    assert not StateWatch.union([second, first]).unchanged()


def test_a_cycle_through_a_watch_is_collected():
    import gc
    import weakref

    module = _Holder()
    watch = StateWatch()
    watch.watch(module.__dict__, ("forward",))
    watch.watch_class(module)
    module.__dict__["_watch"] = watch  # module -> watch -> (its snapshot, its lists) -> module
    assert watch.unchanged()  # (builds the native snapshot)
    alive = weakref.ref(module)
    del module, watch
    gc.collect()
    assert alive() is None


def _set_scale(m, value):
    m.scale = value  # (the interpreter specializes this store after a few calls)


def _set_buf(m, value):
    m._buffers["buf"] = value


@pytest.mark.parametrize("write", [_set_scale, _set_buf])
def test_writes_after_a_passed_check_are_seen_every_time(write):
    """A check that passed remembers each dict's version tag and skips its keys while the tag is the
    same (python/state_snapshot.cpp): every later write, from specialized bytecode too, and a write
    back of the watched object, must still be told apart."""
    module, watch = _watched()
    watched = module.scale if write is _set_scale else module.buf
    for i in range(64):
        assert watch.unchanged()
        write(module, float(i) + 0.5 if write is _set_scale else torch.zeros(3))
        assert not watch.unchanged()
        assert not watch.unchanged()  # (a failed check records nothing)
        write(module, watched)
    assert watch.unchanged()


def test_dict_version_tags_are_trusted_only_where_they_work():
    import sys

    from lwkernels.cpu.backend import native

    assert native().dict_version_tags_work() == (sys.version_info < (3, 14))
