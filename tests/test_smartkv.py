"""The SmartKV layer: budgets met, demotion keeps codes, storage counted, level maps packed."""
import sys
from pathlib import Path

import pytest
import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.cache.layer import KVLayer
from smartkv.methods.smartkv import _indices
from smartkv.models import load_tiny


@pytest.fixture(scope="module")
def tiny():
    return load_tiny("tiny-llama")


def _run(model, steps=24, prompt=40, **params):
    """A cache after a prompt and decode steps. These tests check the re-allocating designs (the incremental one
    unless `realloc` says otherwise); test_append.py checks realloc="append", the default."""
    cache = smartkv.make_cache("smartkv", model, **{"realloc": "incremental", **params})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + steps), generator=g)
    with torch.inference_mode():
        model(ids[:, :prompt], **cache_kwargs(model, cache), use_cache=True)
        for t in range(prompt, prompt + steps):
            model(ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True)
    return cache


@pytest.mark.parametrize("budget,gap", [(2.5, 1.0), (4.0, 2.0), (5.5, 0.0), (8.0, 2.0)])
def test_budget_met_on_keys_and_values(tiny, budget, gap):
    cache = _run(tiny.model, budget=budget, key_value_gap=gap, recent_window=8, realloc_every=8, group_size=32)
    rep = cache.memory_report()
    assert budget - 0.35 <= rep.avg_bits <= budget + 1e-9
    k_budget, v_budget = smartkv.core.policy.kv_budgets(budget, gap)
    for lb in rep.per_layer:
        assert lb["k_bits"] <= k_budget * lb["k_elements"] + 1e-6
        assert lb["v_bits"] <= v_budget * lb["v_elements"] + 1e-6


def test_every_held_tensor_is_counted(tiny, held):
    """memory_report counts every tensor a layer holds, found by walking the layer's objects (pools of several
    widths, level maps, importance, observed ranges, key normalisation, sinks, window), not listed by hand."""
    cache = _run(tiny.model, budget=4, recent_window=8, realloc_every=8, group_size=32)
    for layer in cache.layers:
        assert len(layer.pools["k"]) >= 2 and len(layer.pools["v"]) >= 2
        tensors = held(layer)
        lb = layer.layer_bytes()
        assert sum(tensors.values()) == lb.payload + lb.metadata + lb.residual + layer.slack_bytes(), tensors
    # level maps are 2 bits per (head, token), importance 8 bits: small next to the codes
    layer = cache.layers[0]
    assert layer.levels["k"].dtype == torch.uint8 and layer.importance.dtype == torch.uint8
    n_heads_tokens = layer.batch_size * layer.num_heads * layer.n_middle
    assert layer.levels["k"].numel() <= n_heads_tokens // 4 + 2 * layer.batch_size * layer.num_heads


def test_demotion_keeps_codes_of_unchanged_tokens(tiny):
    cache = smartkv.make_cache("smartkv", tiny.model, budget=4, recent_window=8, realloc_every=8, group_size=32,
                               realloc="incremental")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (1, 80), generator=g)
    layer = cache.layers[1]
    with torch.inference_mode():
        tiny.model(ids[:, :40], **cache_kwargs(tiny.model, cache), use_cache=True)
        before_bits = layer.level_bits("k").clone()
        before = layer._middle_part("k").clone()
        for t in range(40, 56):
            tiny.model(ids[:, t:t + 1], **cache_kwargs(tiny.model, cache), use_cache=True)
    after_bits = layer.level_bits("k")[..., :before_bits.shape[-1]]
    after = layer._middle_part("k")[..., :before_bits.shape[-1], :]
    assert bool((after_bits <= before_bits).all())          # stored codes are never promoted
    same = after_bits == before_bits
    assert same.any()
    assert torch.equal(after[same], before[same])           # bit-exact: codes and scales were kept


def test_key_value_gap_gives_keys_more_bits(tiny):
    rep = _run(tiny.model, budget=4, key_value_gap=2, recent_window=8, realloc_every=8,
               group_size=32).memory_report()
    k = sum(lb["k_bits"] for lb in rep.per_layer) / sum(lb["k_elements"] for lb in rep.per_layer)
    v = sum(lb["v_bits"] for lb in rep.per_layer) / sum(lb["v_elements"] for lb in rep.per_layer)
    assert k > v + 1.5


# At budget 4 (keys 5 bits, values 3 on average) every option moves widths; at 8 all widths are 8 and none can.
OPTIONS_AT = dict(budget=4, key_value_gap=2, recent_window=8, realloc_every=8, group_size=32)
# Measured relative error of stored keys and values against the exact ones (worst layer), per option; bounds 3x.
OPTION_ERRORS = {"default": (0.071, 0.18), "rotate=both": (0.069, 0.18), "rotate=keys": (0.070, 0.18),
                 "importance=uniform": (0.066, 0.154), "importance=sum": (0.095, 0.23),
                 "importance=keynorm": (0.067, 0.161), "key_norm=none": (0.069, 0.19),
                 "key_norm=center": (0.068, 0.19), "sensitivity=False": (0.070, 0.195)}


@pytest.fixture(scope="module")
def option_refs(tiny):
    """(the default options' cache, a cache whose window holds every token: the exact keys and values)."""
    return _run(tiny.model, **OPTIONS_AT), _run(tiny.model, budget=4, recent_window=1 << 20, group_size=32)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("option", list(OPTION_ERRORS))
def test_options_change_widths_and_stay_close_to_fp16(tiny, option_refs, option):
    """Each option, where the budget leaves room for choices: the allocation differs from the default options'
    (measured: 12-36% of the (head, token) widths on average), the budget holds and stored keys and values stay
    within 3x (and above 1/3) of their measured error."""
    default, exact = option_refs
    name, _, value = option.partition("=")
    params = {} if option == "default" else {name: value if value not in ("False", "True") else value == "True"}
    cache = _run(tiny.model, **OPTIONS_AT, **params) if params else default
    assert 4 - 0.35 <= cache.memory_report().avg_bits <= 4 + 1e-9
    moved = []
    for i, (layer, base) in enumerate(zip(cache.layers, default.layers)):
        assert layer.n_middle == base.n_middle > 40
        for kind in ("k", "v"):
            moved.append(float((layer.level_bits(kind) != base.level_bits(kind)).float().mean()))
    if params:
        assert sum(moved) / len(moved) > 0.03, moved
    k_err, v_err = (max(_rel(cache.stored_kv(i)[j], exact.stored_kv(i)[j]) for i in range(2)) for j in (0, 1))
    k_meas, v_meas = OPTION_ERRORS[option]
    assert k_meas / 3 <= k_err <= 3 * k_meas and v_meas / 3 <= v_err <= 3 * v_meas, (k_err, v_err)


@pytest.mark.parametrize("bad", [dict(key_value_gap=7), dict(rotate="yes"), dict(importance="max")])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        smartkv.make_config("smartkv", **bad)


@pytest.mark.slow
def test_embedded_model_budget_and_quality():
    import pydoc_data.topics
    from smartkv.models import load_model
    smol = load_model("smollm2", device="cpu")
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    ids = smol.tokenizer(text, return_tensors="pt")["input_ids"][:, 2000:2400]
    logits = {}
    for name, params in (("fp16", {}), ("smartkv", dict(budget=4.25, key_value_gap=3)), ("int4", {})):
        cache = smartkv.make_cache(name, smol.model, **params)
        with torch.inference_mode():
            smol.model(ids[:, :360], **cache_kwargs(smol.model, cache), use_cache=True)
            out = [smol.model(ids[:, t:t + 1], **cache_kwargs(smol.model, cache), use_cache=True).logits[0, -1]
                   for t in range(360, 400)]
        logits[name] = torch.log_softmax(torch.stack(out).float(), -1)
        if name == "smartkv":
            assert 4.0 <= cache.memory_report().avg_bits <= 4.25 + 1e-9
    kl = {m: float((logits["fp16"].exp() * (logits["fp16"] - logits[m])).sum(-1).mean()) for m in ("smartkv", "int4")}
    assert kl["smartkv"] < kl["int4"], kl


@pytest.mark.parametrize("params", [dict(budget=4.25, key_value_gap=3), dict(budget=3, rotate="both", importance="sum")])
def test_reallocation_reads_only_what_changes(tiny, params):
    """A re-allocation never dequantizes the whole middle: demoted tokens come from their pools (`_gather_values`, the
    same values as indexing the dequantized middle) and the weights read each token's range from its scales and
    zeros (`_ranges`, the dequantized tokens' max - min)."""
    cache = _run(tiny.model, steps=40, recent_window=8, realloc_every=8, group_size=32, **params)
    layer = cache.layers[1]
    g = torch.Generator().manual_seed(3)
    B, H, Tq, D = layer.batch_size, layer.num_heads, layer.n_middle, layer.head_dim
    assert Tq > 40
    new = torch.randn(B, H, 5, D, generator=g)
    for kind in ("k", "v"):
        assert len(layer.pools[kind]) >= 2 or kind == "v"
        whole = torch.cat([layer._middle_part(kind), new], -2)
        for density in (0.0, 0.1, 1.0):
            mask = torch.rand(B, H, Tq + 5, generator=g) < density
            got = layer._gather_values(kind, _indices(mask.flatten()), new)
            assert torch.equal(got, whole[mask])
        expect = whole.amax(-1) - whole.amin(-1)
        assert torch.allclose(layer._ranges(kind, new), expect, rtol=1e-5, atol=1e-6)


# the append design without a ring: its filling flushes' demotions run through Triton's interpreter here (35 s)
@pytest.mark.parametrize("params", [dict(), dict(realloc="append", joint=True, class_norm="previous", ring_tokens=0)])
def test_append_leaves_no_chunk_at_full_precision(params):
    """A cache filled by `append` (no model: bench_e2e's fill) is flushed as a prefill through the model leaves it:
    each window holds fewer than recent_window + realloc_every tokens, not its last chunk at full precision (every
    layer's at once was the largest batch's transient), and every token is kept."""
    from smartkv.methods import make_cache

    layer = make_cache("smartkv", num_layers=1, budget=4.25, key_value_gap=3, **params).layers[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        layer.append(torch.randn(1, 2, 150, 32, generator=g), torch.randn(1, 2, 150, 32, generator=g))
    assert layer.win_k.shape[-2] < layer.config.recent_window + layer.config.realloc_every
    assert layer.sink_k.shape[-2] + layer.n_middle + layer.win_k.shape[-2] == layer.get_seq_length() == 300


def _store(layer, k, v) -> None:
    """Store tokens without the flush SmartKV's `append` runs after them: the tests below set the importance that
    attention would have observed before flushing themselves."""
    KVLayer.append(layer, k, v)


@pytest.mark.parametrize("block_tokens,joint", [(1, False), (4, False), (1, True), (4, True)])
def test_an_allocation_waits_for_the_device_once(block_tokens, joint):
    """On CUDA every host read of a device tensor (a size, a count, nonzero) waits for the GPU, and under a GPU
    shared by several processes for their work too. The first allocation and every incremental re-allocation read
    the device once: one copy of the candidates' rank profiles for the counts' solve (which then runs on the
    host); every other size is known on the host. Counted here on the CPU (benchmarks/syncs.py), leaving out the
    solve's own host arithmetic, which a GPU run does on host tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from syncs import SyncCounter

    from smartkv.methods import make_cache

    def device_waits(c):
        host_solve = ("__init__", "_problem", "counts_for", "counts_for_budgets", "counts", "total", "totals", "assign",
                      "_fill_sorted", "_exact", "counts_many", "_sweep", "_counts_in_step")
        solver = ("core/policy.py", "core/solve.py", "core/counts.py")
        return {site: n for site, n in c.by_site.items() if not (site.startswith(solver) and site.endswith(host_solve))}

    cache = make_cache("smartkv", num_layers=1, budget=4.25, key_value_gap=3, block_tokens=block_tokens, joint=joint,
                       realloc="incremental")
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    _store(layer, torch.randn(2, 4, 600, 64, generator=g), torch.randn(2, 4, 600, 64, generator=g))
    with SyncCounter("cpu") as c:
        layer._flush()
    assert len(layer.pools["k"]) >= 2 and len(layer.pools["v"]) >= 2
    assert sum(device_waits(c).values()) == 1, device_waits(c)
    for _ in range(3):
        before = layer.n_middle
        _store(layer, torch.randn(2, 4, 16, 64, generator=g), torch.randn(2, 4, 16, 64, generator=g))
        with SyncCounter("cpu") as c:
            layer._flush()
        assert layer.n_middle == before + 16                               # it did re-allocate
        assert sum(device_waits(c).values()) == 1, device_waits(c)


@pytest.mark.parametrize("params", [dict(), dict(block_tokens=4), dict(budget=2.4, key_value_gap=1, group_size=32)])
def test_allocations_of_known_sizes_equal_those_that_read_them(params):
    """The first allocation and incremental re-allocations build the pools from sizes known on the host; the
    path that reads them from the device (kept for sliding layers that forgot middle tokens) gives bit-identical
    widths and codes."""
    from smartkv.methods import make_cache

    layers = [make_cache("smartkv", num_layers=1, **{**dict(budget=4.25, key_value_gap=3, realloc="incremental"),
                                                      **params}).layers[0]
              for _ in range(2)]
    reading = layers[1]
    reading._reallocate_candidates = lambda w, k: reading._reallocate_reading_sizes(w, k, bool(reading.n_middle))
    for step, n in enumerate([300, 16, 16, 16, 16]):
        g = torch.Generator().manual_seed(step)
        kv = torch.randn(2, 4, n, 64, generator=g), torch.randn(2, 4, n, 64, generator=g)
        u = torch.rand(2, 4, sum([300, 16, 16, 16, 16][:step + 1]), generator=g)
        for layer in layers:
            _store(layer, *kv)
            layer.importance = (8 * (8 + 12 * u.pow(0.3))).clamp(0, 254).to(torch.uint8)
            layer._flush()
        assert layers[0].n_middle == layers[1].n_middle > 0
        for kind in ("k", "v"):
            assert torch.equal(layers[0].level_bits(kind), layers[1].level_bits(kind))
            assert torch.equal(layers[0]._middle_part(kind), layers[1]._middle_part(kind))
    assert len(layers[0].pools["k"]) >= 2


@pytest.mark.parametrize("realloc", ["full", "incremental"])
def test_block_widths_hold_one_width_per_block_within_the_budget(tiny, realloc):
    """block_tokens=4: the middle holds whole blocks, every block of every (sequence, KV head) has one width for
    keys and one for values, the key and value budgets hold, and stored codes are never promoted."""
    params = dict(budget=4.25, key_value_gap=3, recent_window=8, realloc_every=4, group_size=32, block_tokens=4,
                  realloc=realloc)
    cache = _run(tiny.model, steps=30, **params)
    k_budget, v_budget = smartkv.core.policy.kv_budgets(4.25, 3)
    for layer, lb in zip(cache.layers, cache.memory_report().per_layer, strict=True):
        assert layer.n_middle % 4 == 0 and layer.n_middle >= 40 + 30 - 4 - 8 - 8
        for kind in ("k", "v"):
            blocks = layer.level_bits(kind).reshape(layer.batch_size, layer.num_heads, -1, 4)
            assert torch.equal(blocks, blocks[..., :1].expand_as(blocks)), kind
        assert lb["k_bits"] <= k_budget * lb["k_elements"] + 1e-6
        assert lb["v_bits"] <= v_budget * lb["v_elements"] + 1e-6
        assert len(layer.pools["k"]) >= 2


def test_incremental_reallocation_demotes_a_bounded_number_of_blocks(tiny):
    """After the prompt's allocation, each incremental re-allocation changes the width of at most one stored
    block per width above the narrowest (keys and values each), and never promotes one."""
    params = dict(budget=4.25, key_value_gap=3, recent_window=8, realloc_every=4, group_size=32, block_tokens=4,
                  realloc="incremental")
    cache = smartkv.make_cache("smartkv", tiny.model, **params)
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(2))
    layer = cache.layers[1]
    with torch.inference_mode():
        tiny.model(ids[:, :40], **cache_kwargs(tiny.model, cache), use_cache=True)
        for t in range(40, 80):
            before = {kind: layer.level_bits(kind).clone() for kind in ("k", "v")}
            tiny.model(ids[:, t:t + 1], **cache_kwargs(tiny.model, cache), use_cache=True)
            for kind, old in before.items():
                now = layer.level_bits(kind)[..., :old.shape[-1]]
                assert bool((now <= old).all())
                changed_blocks = (now != old).reshape(*old.shape[:2], -1, 4).any(-1).sum(-1)
                assert int(changed_blocks.max()) <= len(layer.widths) - 1, (t, kind)


def _class_counts(layer) -> list[dict]:
    """Per row (sequence x KV head), tokens of each (key width, value width) class, from the level maps."""
    k, v = (layer.level_bits(kind).flatten(0, 1) for kind in ("k", "v"))
    return [{c: int(((kr == c[0]) & (vr == c[1])).sum()) for c in {(int(a), int(b)) for a, b in zip(kr, vr)}}
            for kr, vr in zip(k, v)]


def _check_class_slices(layer) -> None:
    """Class-major pools: class (kw, vw)'s tokens, in position order, are one slice of key pool kw (after the
    classes of narrower value widths) and one of value pool vw (after those of narrower key widths)."""
    from smartkv.core.quant import dequantize

    assert layer._class_major
    classes = sorted(layer._classes)
    kb, vb = (layer.level_bits(kind)[0, 0] for kind in ("k", "v"))
    for i, kind in enumerate(("k", "v")):
        mid = layer._middle_part(kind)[0, 0]
        for c in classes:
            before = sum(layer._classes[d] for d in classes if d[i] == c[i] and d[1 - i] < c[1 - i])
            pool = layer.pools[kind][c[i]]
            sl = dequantize(pool)[0, 0, before:before + layer._classes[c]]
            assert torch.equal(sl, mid[(kb == c[0]) & (vb == c[1])]), (kind, c)


@pytest.mark.parametrize("params", [dict(budget=4.25, key_value_gap=3),
                                    dict(budget=4.25, key_value_gap=3, block_tokens=4),
                                    dict(budget=2.4, key_value_gap=1, recent_window=8, realloc_every=8)])
def test_joint_gives_every_row_the_same_class_counts(params):
    """joint=True: after the first allocation and every incremental re-allocation each row holds the same number
    of tokens in each (key width, value width) class, the layer's host count (`_classes`) says which, each kind
    stays within its budget, and the first allocation is the per-kind one (one ranking for both already)."""
    from smartkv.methods import make_cache

    g = torch.Generator().manual_seed(1)
    kv = [torch.randn(2, 4, 600 + 16 * 6, 64, generator=g) for _ in range(2)]
    seen = torch.randint(0, 120, (2, 4, 600 + 16 * 6), generator=g, dtype=torch.uint8)  # attention seen: codes

    def add(layer, a, b):
        _store(layer, kv[0][..., a:b, :], kv[1][..., a:b, :])
        layer.importance[..., -(b - a):] = seen[..., a:b]
        layer._flush()
    layers = [make_cache("smartkv", num_layers=1, joint=j, realloc="incremental", **params).layers[0]
              for j in (False, True)]
    for layer in layers:
        add(layer, 0, 600)
    assert all(torch.equal(layers[0].levels[kind], layers[1].levels[kind]) for kind in ("k", "v"))
    # the same codes, stored class-major: every token reads back as in position-ordered pools
    assert all(torch.equal(layers[0]._middle_part(kind), layers[1]._middle_part(kind)) for kind in ("k", "v"))
    layer = layers[1]
    _check_class_slices(layer)
    for r in range(6):
        before = {kind: (layer.level_bits(kind), layer._middle_part(kind)) for kind in ("k", "v")}
        add(layer, 600 + 16 * r, 616 + 16 * r)
        for kind, (bits, held) in before.items():   # kept codes stay, bit for bit; new values land where they belong
            same = layer.level_bits(kind)[..., :bits.shape[-1]] == bits
            assert same.float().mean() > 0.5 and torch.equal(layer._middle_part(kind)[..., :bits.shape[-1], :][same],
                                                             held[same])
        fresh = layer._middle_part("v")[..., -16:, :]
        end = layer.sink_v.shape[-2] + layer.n_middle                  # the window's oldest 16 joined the middle
        true = kv[1][..., end - 16:end, :]
        assert ((fresh - true).norm() / true.norm()).item() < 0.6    # 2-bit Gaussian values: ~0.45
        counts = _class_counts(layer)
        assert all(c == counts[0] for c in counts) and counts[0] == layer._classes
        assert len(counts[0]) >= 2
        _check_class_slices(layer)
        for kind, budget in (("k", layer.budget_k), ("v", layer.budget_v)):
            assert int(layer.level_bits(kind)[0, 0].sum()) <= budget * layer.n_middle + 1e-6
    layer.reset()                                   # a new sequence: its first allocation counts afresh
    add(layer, 0, 600)
    assert _class_counts(layer)[0] == layer._classes


def test_joint_candidates_reach_each_kind_grouped_by_its_width():
    """`_repool_candidates` takes a kind's stored candidates grouped by that kind's width, ascending: classes
    (4, 3) and (8, 2) come in that order for keys and the other way round for values."""
    from smartkv.core.classes import JointCandidates
    from smartkv.methods.smartkv.joint import SmartKVJoint

    idx = torch.tensor([[10, 11, 3, 5, 7]])                 # two new units, then (4, 3) x 2, then (8, 2) x 1
    cand = JointCandidates(idx, idx.double(), idx * 0 + 8, idx * 0 + 4, (5.0, 3.0), 2, {(4, 3): 2, (8, 2): 1})
    keys, order_k = SmartKVJoint._kind_view(cand, 0)
    values, order_v = SmartKVJoint._kind_view(cand, 1)
    assert keys.idx.tolist() == [[10, 11, 3, 5, 7]] and keys.sources == {4: 2, 8: 1}
    assert values.idx.tolist() == [[10, 11, 7, 3, 5]] and values.sources == {2: 1, 3: 2}
    assert order_v.tolist() == [0, 1, 4, 2, 3]
