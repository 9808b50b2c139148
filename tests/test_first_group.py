"""SmartKV's first allocation of a group of layers at once (first.py): the state, the decode that follows and the
memory report are exactly the per-layer path's, whatever the group's size; a layer waits in its group until the
group's last layer has attended; a forward that stops part way leaves its waiting layers whole, and reading them
runs their group."""
import pytest
import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.core.counts import device_tables
from smartkv.methods.smartkv import SmartKVLayer
from smartkv.methods.smartkv.first import group_size
from smartkv.models import load_tiny

P = dict(budget=4.25, key_value_gap=3, recent_window=8, realloc_every=4, group_size=16, ring_tokens=32)


@pytest.fixture(scope="module")
def five():
    """Five layers whose attention grows sharper layer by layer (queries scaled), so their profiles differ."""
    model = load_tiny("tiny-llama", num_hidden_layers=5, device="cuda" if torch.cuda.is_available() else "cpu").model
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            block.self_attn.q_proj.weight *= 1 + 3 * i
    return model


def _ids(batch=2, prompt=200):
    ids = torch.randint(3, 500, (batch, prompt), generator=torch.Generator().manual_seed(5))
    return ids.cuda() if torch.cuda.is_available() else ids


def _state(layer) -> list:
    """Every tensor and host count of an append layer's state, in a fixed order."""
    a = layer._app
    out = [layer.n_middle, a.widths, a.n, a.mix, a.ring, a.ring_n, a.plan, layer.win_k, layer.win_v, layer.k_mu,
           layer.k_scale, a.cmap, a.length, a.rank_class, a.wimp, a.wseen, a.move_k, a.cseen, a.lse]
    for q in a.k + a.v + [a.ring_k, a.ring_v]:
        out += [q.codes, q.scale, q.zero]
    return out + list(a.cimp or [])


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
    return x == y


def _run(model, monkeypatch, size: int, steps: int = 6, together: str = "1"):
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", str(size))
    monkeypatch.setenv("SMARTKV_SOLVES_TOGETHER", together)
    ids = _ids()
    cache = smartkv.make_cache("smartkv", model, **P)
    with torch.inference_mode():
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        states = [_state(layer) for layer in cache.layers]
        logits = [out.logits[:, -1]]
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):   # eager decode steps: each flush after 4 tokens, the ring's demotions included
            out = model(nxt, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return states, torch.stack(logits), cache.memory_report()


@pytest.mark.parametrize("size,together", [(2, "1"), (3, "1"), (8, "1"), (8, "0")])
def test_a_group_gives_the_per_layer_state_decode_and_bytes(five, monkeypatch, size, together):
    """The group's host solves ask their counts together (`solves.solve_asks`) or each on its own: the state is
    one layer's at a time either way."""
    ref_states, ref_logits, ref_report = _run(five, monkeypatch, 1)
    states, logits, report = _run(five, monkeypatch, size, together=together)
    for i, (got, want) in enumerate(zip(states, ref_states)):
        bad = [j for j, (x, y) in enumerate(zip(got, want)) if not _same(x, y)]
        assert not bad, (size, i, bad)
    assert torch.equal(logits, ref_logits)
    assert report.per_layer == ref_report.per_layer


def test_each_layer_solves_on_its_own_statistics(five, monkeypatch):
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", "8")
    got = []
    finish = SmartKVLayer._first_finish

    def recorded(self, first, stats):
        own = torch.cat([first.stats, device_tables(first.stats[:first.n], self.widths)]).cpu()   # this layer's
        got.append((self.layer_idx, stats.clone(), own))
        return finish(self, first, stats)

    monkeypatch.setattr(SmartKVLayer, "_first_finish", recorded)
    cache = smartkv.make_cache("smartkv", five, **P)
    with torch.inference_mode():
        five(_ids(), **cache_kwargs(five, cache), use_cache=True)
    assert [i for i, _, _ in got] == list(range(5))
    assert all(torch.equal(stats, own) for _, stats, own in got)
    assert not torch.equal(got[0][1], got[4][1])   # the layers' statistics differ: a mix-up would show


def test_a_layer_waits_for_its_groups_last_layer(five, monkeypatch):
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", "3")
    cache = smartkv.make_cache("smartkv", five, **P)
    seen = []

    def before(i):   # what the earlier layers hold when layer i starts
        return lambda *_: seen.append([layer._app is not None for layer in cache.layers[:i]])

    hooks = [block.register_forward_pre_hook(before(i)) for i, block in enumerate(five.model.layers)]
    try:
        with torch.inference_mode():
            five(_ids(), **cache_kwargs(five, cache), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    # groups of three: layers 0-2 allocate when layer 2 has attended, layers 3-4 at the model's last layer
    assert seen == [[], [False], [False, False], [True, True, True], [True, True, True, False]]
    assert all(layer._app is not None for layer in cache.layers)


def test_a_group_runs_once_it_holds_its_bytes(five, monkeypatch):
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", "8")
    monkeypatch.setenv("SMARTKV_FIRST_GROUP_MIB", "1")
    cache = smartkv.make_cache("smartkv", five, **P)
    seen = []
    hooks = [block.register_forward_pre_hook(lambda *_: seen.append(
        [getattr(layer, "_app", None) is not None for layer in cache.layers])) for block in five.model.layers]
    try:
        with torch.inference_mode():   # each layer waits with ~0.6 MiB (prompt and kept keys): groups of two
            five(_ids(prompt=600), **cache_kwargs(five, cache), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    assert [sum(s) for s in seen] == [0, 0, 2, 2, 4]
    assert all(layer._app is not None for layer in cache.layers)


def test_a_forward_stopped_part_way_leaves_whole_layers(five, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    reports = {}
    for size in (1, 8):
        monkeypatch.setenv("SMARTKV_FIRST_GROUP", str(size))
        cache = smartkv.make_cache("smartkv", five, **P)
        hook = five.model.layers[3].register_forward_pre_hook(stop)
        try:
            with torch.inference_mode(), pytest.raises(Stop):
                five(_ids(), **cache_kwargs(five, cache), use_cache=True)
        finally:
            hook.remove()
        if size == 8:   # layers 0-2 wait in their group; the report runs it
            assert [layer._app is None for layer in cache.layers[:3]] == [True] * 3
        reports[size] = cache.memory_report().per_layer[:3]
        assert all(layer._app is not None for layer in cache.layers[:3])
    assert reports[8] == reports[1]


def test_a_bad_group_size_is_named(monkeypatch):
    for name, bad, top in [("SMARTKV_FIRST_GROUP", "0", 1024), ("SMARTKV_FIRST_GROUP", "x", 1024),
                           ("SMARTKV_FIRST_GROUP", "2000", 1024), ("SMARTKV_FIRST_GROUP_MIB", "-1", 1 << 20)]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name} must be an integer from 1 to {top}, got '{bad}'"):
            group_size()
        monkeypatch.delenv(name)
    monkeypatch.setenv("SMARTKV_SOLVES_TOGETHER", "2")
    with pytest.raises(ValueError, match="SMARTKV_SOLVES_TOGETHER must be an integer from 0 to 1, got '2'"):
        smartkv.make_cache("smartkv", num_layers=2)
