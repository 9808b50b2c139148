"""A group's filling flushes' demotions run once over every layer's rows at the group's last flush (stacked.py): the
same state and logits as each layer's own at its flush, the class buffers grown for the whole group at once, and a
layer read before the group's last flush demotes on its own."""
import pytest
import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.methods.smartkv import SmartKVLayer
from smartkv.methods.smartkv import stacked
import test_first_group
from test_first_group import P, _ids, _same, _state, _used

five = test_first_group.five   # its fixture: five tiny layers whose attention differs layer by layer

_RUN, _REGROW = stacked.Stack._run, SmartKVLayer._append_regrow


def _decode(model, monkeypatch, flag: str, steps: int, reserve: int = 0, stop_at: int | None = None, hook=None):
    """A prefill and `steps` eager steps with SMARTKV_STACKED_DEMOTIONS=`flag`; with `stop_at`, the last step's
    forward stops before that layer; `hook` (step, fn): fn(cache) before that step. -> cache, logits of every
    step, stacked runs and layers' own regrowths."""
    monkeypatch.setenv("SMARTKV_STACKED_DEMOTIONS", flag)
    counts = {"runs": 0, "regrow": 0}

    def counted_run(self):
        counts["runs"] += 1
        return _RUN(self)

    def counted_regrow(self, caps):
        counts["regrow"] += 1
        return _REGROW(self, caps)
    monkeypatch.setattr(stacked.Stack, "_run", counted_run)
    monkeypatch.setattr(SmartKVLayer, "_append_regrow", counted_regrow)
    cache = smartkv.make_cache("smartkv", model, **P)
    logits = []
    with torch.inference_mode():
        out = model(_ids(), **cache_kwargs(model, cache), use_cache=True)
        if reserve:   # a decoder that announces its length: the classes grow to it at the first flush
            cache.reserve(_ids().shape[1] + reserve)
        for step in range(steps):
            if hook is not None and step == hook[0]:
                hook[1](cache)
            nxt = out.logits[:, -1:].argmax(-1)
            if stop_at is not None and step == steps - 1:
                return cache, _stopped(model, cache, nxt, stop_at), counts
            out = model(nxt, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
    return cache, torch.stack(logits), counts


class _Stop(Exception):
    pass


def _stopped(model, cache, nxt, layer: int):
    def stop(*_):
        raise _Stop

    hook = model.model.layers[layer].register_forward_pre_hook(stop)
    try:
        with pytest.raises(_Stop):
            model(nxt, **cache_kwargs(model, cache), use_cache=True)
    finally:
        hook.remove()


def _same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit on the CPU's reference path. The kernels' work over a segment follows its buffer's capacity
    (rows past its length masked), and at the flush that fills the ring the mix's growth reaches every layer of the
    stack at layer 0's flush, before the later layers' attention in that step, where each layer's own grows after
    its own (64 -> 320 rows, the same rows used): their logits there differ by rounding (1.4e-6 on an H100, 1.8e-7
    in Triton's interpreter; benchmarks/stacked_gpu.out, stacked_diag.py), the state bit for bit. So the kernels'
    bound is a few times that."""
    if got.is_cuda:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("steps,reserve", [(10, 0), (40, 0), (40, 400)])
def test_a_groups_stacked_demotions_are_each_layers_own(five, monkeypatch, steps, reserve):
    """Mid-fill and past it (the ring of 32 fills in 8 flushes of 4), and with a reserved length that grows the
    classes at the first flush: the state and every step's logits as each layer demoting at its own flush."""
    cache, logits, counts = _decode(five, monkeypatch, "1", steps, reserve)
    ref, ref_logits, ref_counts = _decode(five, monkeypatch, "0", steps, reserve)
    flushes = min(8, (steps - 2) // 4)   # the demoting flushes: at steps 3, 7, 11, ...
    assert counts["runs"] == flushes and ref_counts["runs"] == 0
    if reserve:   # the group grew once, stacked, where each layer grew its own
        assert counts["regrow"] == 0 and ref_counts["regrow"] == len(cache.layers)
    _same_logits(logits, ref_logits)
    # a full ring's layers hold no stack (its buffers, the importance codes among them, go)
    assert [layer._app.stack is None for layer in cache.layers] == [steps > 35] * len(cache.layers)
    for i, (layer, want) in enumerate(zip(cache.layers, ref.layers)):
        bad = [j for j, (x, y) in enumerate(zip(_used(layer), _used(want))) if not _same(x, y)]
        assert not bad, (i, bad)
    for got, want in zip(cache.memory_report().per_layer, ref.memory_report().per_layer):   # the stacked
        assert {k: v for k, v in got.items() if k != "slack"} == {k: v for k, v in want.items() if k != "slack"}
        # regrowth rounds capacities up to 16 rows (each layer's rows aligned in the block)


def test_a_layer_read_before_its_groups_last_flush_demotes_on_its_own(five, monkeypatch):
    """A flushing step's forward stops at layer 3: layers 0-2 hold their demotions waiting for the group's; reading
    the cache runs each one's own, which then holds what it holds without stacking."""
    steps = 8   # the last step flushes (steps 3, 7, 11, ... do): the second demoting flush
    cache, _, counts = _decode(five, monkeypatch, "1", steps, stop_at=3)
    stack = cache.layers[0]._app.stack
    assert [x for x, _, _ in stack.waiting] == cache.layers[:3] and counts["runs"] == 1
    report = cache.memory_report()
    assert not stack.waiting
    ref, _, _ = _decode(five, monkeypatch, "0", steps, stop_at=3)
    assert report.per_layer == ref.memory_report().per_layer
    for layer, want in zip(cache.layers, ref.layers):
        assert all(_same(x, y) for x, y in zip(_state(layer), _state(want)))


def test_a_layer_that_takes_buffers_of_its_own_dissolves_the_stack(five, monkeypatch):
    """One layer's classes sized exactly for it (as a static phase sizes them) mid-fill: every layer demotes on its
    own from then on (the old block goes), with the state of never having stacked."""
    def exact(cache):
        stack = cache.layers[0]._app.stack
        cache.layers[2]._append_reserve(1, exact=True)
        assert stack is None or not stack.alive
        assert all(layer._app.stack is None for layer in cache.layers)

    cache, logits, counts = _decode(five, monkeypatch, "1", 30, hook=(9, exact))
    ref, ref_logits, _ = _decode(five, monkeypatch, "0", 30, hook=(9, exact))
    assert counts["runs"] == 2   # the flushes at steps 3 and 7; those at 11, 15, ... each layer's own
    _same_logits(logits, ref_logits)
    for layer, want in zip(cache.layers, ref.layers):
        assert all(_same(x, y) for x, y in zip(_used(layer), _used(want)))


def test_a_bad_stacked_setting_is_named(monkeypatch):
    monkeypatch.setenv("SMARTKV_STACKED_DEMOTIONS", "yes")
    with pytest.raises(ValueError, match="SMARTKV_STACKED_DEMOTIONS must be an integer from 0 to 1, got 'yes'"):
        smartkv.make_cache("smartkv", num_layers=2)
