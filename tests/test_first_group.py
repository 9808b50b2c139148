"""SmartKV's first allocation of a group of layers at once (first.py, place.py): the group's layers share one solve on
their pooled rank profile, and its stacked placement gives each layer the state, decode and bytes of placing it on
its own at that solve; a layer waits in its group until the group's last layer has attended; a forward that stops
part way leaves its waiting layers whole, and reading them runs their group."""
from pathlib import Path

import pytest
import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.core.counts import device_tables
from smartkv.methods.smartkv import SmartKVLayer
from smartkv.methods.smartkv import classmap
from smartkv.methods.smartkv import first as first_mod
from smartkv.methods.smartkv.first import group_size, pooled
from smartkv.methods.smartkv.place import place
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


def _run(model, monkeypatch, size: int, steps: int = 6, together: str = "1", state=_state):
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", str(size))
    monkeypatch.setenv("SMARTKV_SOLVES_TOGETHER", together)
    ids = _ids()
    cache = smartkv.make_cache("smartkv", model, **P)
    with torch.inference_mode():
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        states = [state(layer) for layer in cache.layers]
        logits = [out.logits[:, -1]]
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):   # eager decode steps: each flush after 4 tokens, the ring's demotions included
            out = model(nxt, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return states, torch.stack(logits), cache.memory_report()


def _used(layer) -> list:
    """`_state` with each class buffer's and the class map's used part only (a group's buffers have their
    capacity rounded up so that each layer's rows start aligned in the stacked block)."""
    a = layer._app
    out = [layer.n_middle, a.widths, a.n, a.mix, a.ring, a.ring_n, a.plan, layer.win_k, layer.win_v, layer.k_mu,
           layer.k_scale, a.cmap[..., :classmap.used_bytes(layer.n_middle - a.ring_n)], a.length, a.rank_class,
           a.wimp, a.wseen, a.move_k, a.cseen, a.lse]
    for q, n in zip(a.k + a.v, a.n + a.n):
        out += [q.codes[..., :n, :], q.scale[..., :n, :], q.zero[..., :n, :]]
    for q in (a.ring_k, a.ring_v):
        out += [q.codes, q.scale, q.zero]
    return out + [c[..., :n] for c, n in zip(a.cimp or [], a.n)]


@pytest.mark.parametrize("together", ["1", "0"])
def test_a_groups_stacked_placement_is_each_layers_own(five, monkeypatch, together):
    """The group's placement (all its layers in one set of launches) against placing each layer on its own at the
    same solve; the host solves ask their counts together (`solves.solve_asks`) or each on its own."""
    runs = {}
    for stacked in (True, False):
        if not stacked:   # the same solve, each layer placed as a group of one
            monkeypatch.setattr(first_mod, "place", lambda layers, first, budgets: [
                place([layer], first.layer(i), budgets) for i, layer in enumerate(layers)])
        runs[stacked] = _run(five, monkeypatch, 8, together=together, state=_used)
    (states, logits, report), (ref_states, ref_logits, ref_report) = runs[True], runs[False]
    for i, (got, want) in enumerate(zip(states, ref_states)):
        bad = [j for j, (x, y) in enumerate(zip(got, want)) if not _same(x, y)]
        assert not bad, (i, bad)
    assert torch.equal(logits, ref_logits)
    for got, want in zip(report.per_layer, ref_report.per_layer):   # the same bytes but for the rounded capacity
        assert {k: v for k, v in got.items() if k != "slack"} == {k: v for k, v in want.items() if k != "slack"}


def test_a_groups_layers_share_one_solve_on_their_pooled_profile(five, monkeypatch):
    got, firsts = [], []
    split, prepare = SmartKVLayer._append_split, first_mod.prepare

    def recorded(self, weights, kinds, stats):
        got.append((self.layer_idx, stats.clone()))
        return (yield from split(self, weights, kinds, stats))

    def kept(layers, n):
        firsts.append(prepare(layers, n))
        return firsts[-1]

    monkeypatch.setattr(SmartKVLayer, "_append_split", recorded)
    monkeypatch.setattr(first_mod, "prepare", kept)
    for size in (8, 1):
        got.clear()
        firsts.clear()
        monkeypatch.setenv("SMARTKV_FIRST_GROUP", str(size))
        cache = smartkv.make_cache("smartkv", five, **P)
        with torch.inference_mode():
            five(_ids(), **cache_kwargs(five, cache), use_cache=True)
        n, widths = firsts[0].n, cache.layers[0].widths
        counts = [layer._app.n for layer in cache.layers]
        if size == 8:   # one solve for the five layers, on their profiles scaled to sum 1 and averaged
            assert [i for i, _ in got] == [0] and len(firsts) == 1
            st = firsts[0].stats
            assert st.shape == (5, n + 1)
            mean = (st / st[:, :n].sum(-1, keepdim=True)).mean(0)
            assert torch.equal(got[0][1], torch.cat([mean, device_tables(mean[:n], widths)]).cpu())
            assert all(c == counts[0] for c in counts)
        else:   # each layer on its own statistics, unscaled
            assert [i for i, _ in got] == list(range(5))
            own = [torch.cat([f.stats[0], device_tables(f.stats[0, :n], widths)]).cpu() for f in firsts]
            assert all(torch.equal(stats, mine) for (_, stats), mine in zip(got, own))
            assert len({tuple(c) for c in counts}) > 1   # the layers' profiles differ: a shared solve would show


def test_a_groups_stacked_device_work_is_each_layers_own(five, monkeypatch):
    """`prepare` of a group's layers stacked (one set of launches) gives each layer the weights, statistics, order,
    stored-space prompt and key normalisation it gets alone (rows' arithmetic alike: equal to float rounding)."""
    prepare, seen = first_mod.prepare, {}

    def both(layers, n):
        before = [{k: getattr(x, k) for k in ("win_k", "win_v", "k_mu", "k_scale", "importance", "observed")}
                  for x in layers]
        alone = []
        for layer, state in zip(layers, before):
            alone.append(prepare([layer], n))
            alone[-1].kept = (layer.win_k, layer.k_mu, layer.k_scale)
            for k, v in state.items():
                setattr(layer, k, v)
        together = prepare(layers, n)
        seen["pairs"] = [(together.layer(i), a, (x.win_k, x.k_mu, x.k_scale)) for i, (a, x) in
                         enumerate(zip(alone, layers))]
        return together

    monkeypatch.setattr(first_mod, "prepare", both)
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", "8")
    cache = smartkv.make_cache("smartkv", five, **P)
    with torch.inference_mode():
        five(_ids(), **cache_kwargs(five, cache), use_cache=True)
    assert len(seen["pairs"]) == 5
    for got, want, kept in seen["pairs"]:
        for x, y in zip((got.weights, got.new_k, got.new_v, got.importance, got.stats, *kept),
                        (want.weights, want.new_k, want.new_v, want.importance, want.stats, *want.kept)):
            assert x.shape == y.shape and torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6)
        assert (got.order == want.order).float().mean() > 0.99   # ties of rounding aside, the same ranking


def test_a_pooled_profile_weighs_each_layer_alike():
    """Each layer's profile is scaled to sum 1 before the mean: a layer whose weights are 1000x another's does not
    decide the group's solve alone; a group of one keeps its own statistics."""
    a = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.2], dtype=torch.float64)
    assert torch.allclose(pooled(torch.stack([a, 1000 * b]), 4), pooled(torch.stack([a, b]), 4))
    assert torch.allclose(pooled(torch.stack([a, b]), 4), (a / 8 + b / 4) / 2)
    assert torch.equal(pooled(a[None], 4), a)


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


@pytest.fixture(scope="module")
def twelve():
    """More layers than any small fixed group size."""
    return load_tiny("tiny-llama", num_hidden_layers=12, device="cuda" if torch.cuda.is_available() else "cpu").model


def test_by_default_a_prefill_is_one_group_and_waits_once(twelve, monkeypatch):
    """Unset, the group holds every layer the bytes allow: a short prompt's prefill is one group (one solve, one
    copy of its statistics to the host), since each group costs the prefill a wait for the device and a set of host
    calls."""
    monkeypatch.delenv("SMARTKV_FIRST_GROUP", raising=False)
    monkeypatch.delenv("SMARTKV_FIRST_GROUP_MIB", raising=False)
    calls = []
    real = first_mod.first_allocations
    monkeypatch.setattr(first_mod, "first_allocations", lambda layers, *a: calls.append(len(layers)) or real(
        layers, *a))
    cache = smartkv.make_cache("smartkv", twelve, **P)
    with torch.inference_mode():
        twelve(_ids(prompt=600), **cache_kwargs(twelve, cache), use_cache=True)
    assert calls == [12] and all(layer._app is not None for layer in cache.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waits for a GPU: a CPU has none")
def test_a_prefill_waits_for_the_device_once_a_group(twelve, monkeypatch):
    """The project's synchronising operations in one prefill (benchmarks/syncs.py's `device_waits`: torch's sync
    debug mode names each one's caller): the group's one copy of its statistics, nothing a layer (each layer's first
    call once made a blocking copy to the device: a wait behind every queued layer, and on a shared GPU behind the
    other processes' work)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from syncs import device_waits

    monkeypatch.delenv("SMARTKV_FIRST_GROUP", raising=False)
    monkeypatch.delenv("SMARTKV_FIRST_GROUP_MIB", raising=False)
    ids = _ids(prompt=600)
    for _ in range(2):   # the second prefill counted: the first compiles and warms the allocator
        cache = smartkv.make_cache("smartkv", twelve, **P)
        with device_waits() as found, torch.inference_mode():
            twelve(ids, **cache_kwargs(twelve, cache), use_cache=True)
    ours = [[f.name for f in frames] for frames in found if frames]
    assert len(ours) == 1 and "finish" in ours[0], ours


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
    """Layers 0-2 wait in their group when the forward stops at layer 3; reading the cache runs the group, which
    then holds what a group of those three layers holds after a whole forward."""
    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    monkeypatch.setenv("SMARTKV_FIRST_GROUP", "8")
    cache = smartkv.make_cache("smartkv", five, **P)
    hook = five.model.layers[3].register_forward_pre_hook(stop)
    try:
        with torch.inference_mode(), pytest.raises(Stop):
            five(_ids(), **cache_kwargs(five, cache), use_cache=True)
    finally:
        hook.remove()
    assert [layer._app is None for layer in cache.layers[:3]] == [True] * 3
    stopped = cache.memory_report().per_layer[:3]
    assert all(layer._app is not None for layer in cache.layers[:3])
    monkeypatch.setenv("SMARTKV_FIRST_GROUP", "3")
    whole = smartkv.make_cache("smartkv", five, **P)
    with torch.inference_mode():
        five(_ids(), **cache_kwargs(five, whole), use_cache=True)
    assert stopped == whole.memory_report().per_layer[:3]
    for layer, ref in zip(cache.layers[:3], whole.layers[:3]):
        assert all(_same(x, y) for x, y in zip(_state(layer), _state(ref)))


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
