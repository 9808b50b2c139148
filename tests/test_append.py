"""SmartKV's realloc="append" (with joint=True): the budget holds flush by flush, the prompt's tokens only go down
while the ring fills (the least attended first) and nothing moves after, every flush gives its tokens the mix's
classes by weight, chunked and step-by-step flushes agree, and the fused and static steps give what the reference
path gives (kernels through Triton's CPU interpreter)."""
import dataclasses

import pytest
import torch

import smartkv
import smartkv.cache.layer as cache_mod
from smartkv.cache.layer import KVLayer
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.core.classes import flush_mix, ring_widths
from smartkv.core.importance import decode_importance, encode_importance
from smartkv.core.policy import WIDTHS, kv_budgets, solve_widths
from smartkv.core.quant import dequantize, quantize
from smartkv.methods import make_cache
from smartkv.methods.smartkv import classmap
from smartkv.models import load_tiny

P = dict(budget=4.25, key_value_gap=3, recent_window=8, realloc_every=4, group_size=16, ring_tokens=8,
         realloc="append", joint=True)


@pytest.fixture(scope="module")
def tiny():
    return load_tiny("tiny-llama").model


def _classes_of(layer, n=None):
    """Each middle position's class id (B, H, n) from the layer's 4-bit map, by default up to the ring."""
    return classmap.read(layer._app.cmap, layer.n_middle - layer._app.ring_n if n is None else n)


def _ids(batch=2, prompt=30):
    return torch.randint(3, 500, (batch, prompt), generator=torch.Generator().manual_seed(11))


def test_flush_mix_spends_each_kinds_budget():
    profile = torch.sort(torch.rand(500, generator=torch.Generator().manual_seed(0)) ** 4, descending=True).values
    for budget, gap, widths, n in [(4.25, 3, (2, 3, 4, 8), 16), (2.4, 1, (2, 3, 4, 8), 8), (6, 2, (2, 4, 8), 16)]:
        mix = flush_mix(profile, kv_budgets(budget, gap, widths), widths, n)
        bk, bv = kv_budgets(budget, gap, widths)
        assert sum(m for _, _, m in mix) == n
        assert bk * n - 1 < sum(k * m for k, _, m in mix) <= bk * n
        assert bv * n - 1 < sum(v * m for _, v, m in mix) <= bv * n
        # heaviest first: neither kind's width grows along the mix
        assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(mix, mix[1:])), mix


def test_ring_widths_minimise_the_modelled_error():
    """Per kind, the ring's width is the one whose modelled error (its tokens at `recent` each, plus the prompt's
    tokens solved per token at the bits the ring leaves) is least among the widths no narrower than the kind's budget
    that leave the prompt its narrowest width: tokens nobody reads get the narrowest of those, tokens read far above
    the prompt the widest; where one token a flush earns
    8-bit values (the mix's top class), a ring read as the prompt's newest tokens are does not get them."""
    g = torch.Generator().manual_seed(0)
    n, ring = 500, 64
    for power in (4, 16):
        profile = torch.sort(torch.rand(n, generator=g) ** power, descending=True).values
        for budget, gap in [(4.25, 3), (2.4, 1), (6, 2)]:
            budgets = kv_budgets(budget, gap)
            for recent in (0.0, float(profile.mean()), float(profile[:ring].mean()), 1e6):
                got = ring_widths(profile, recent, budgets, WIDTHS, ring)
                for b, w_got in zip(budgets, got):
                    bits = int(b * (n + ring) + 1e-9)
                    errs = {}
                    for w in WIDTHS:
                        if w >= b and bits - ring * w >= min(WIDTHS) * n:
                            given = torch.sort(solve_widths(profile, (bits - ring * w) / n), descending=True).values
                            errs[w] = ring * recent * 4.0 ** -w + float((profile.double() * 4.0 ** -given).sum())
                    assert errs[w_got] <= min(errs.values()) * (1 + 1e-9), (budget, recent, errs, w_got)
                    if recent == 0.0:
                        assert w_got == min(errs)
                    if recent == 1e6:
                        assert w_got == max(errs)
    heavy = torch.sort(torch.rand(n, generator=g) ** 16, descending=True).values
    budgets = kv_budgets(4.25, 3)
    assert flush_mix(heavy, budgets, WIDTHS, 16)[0][:2] == (8, 8)
    assert ring_widths(heavy, float(heavy[:ring].mean()), budgets, WIDTHS, ring) == (8, 4)


def test_budget_holds_and_every_held_tensor_is_counted(tiny, held, decode):
    _, _, cache, _ = decode(tiny, "smartkv", _ids(), 20, "eager", **P)
    k_budget, v_budget = kv_budgets(4.25, 3)
    for layer, lb in zip(cache.layers, cache.memory_report().per_layer):
        assert layer._app is not None and layer.n_middle > 30
        assert lb["k_bits"] <= k_budget * lb["k_elements"] + 1e-6
        assert lb["v_bits"] <= v_budget * lb["v_elements"] + 1e-6
        assert lb["k_bits"] >= (k_budget - 0.5) * lb["k_elements"]
        tensors = held(layer, cache.layers)
        b = layer.layer_bytes()
        assert sum(tensors.values()) == b.payload + b.metadata + b.residual + layer.slack_bytes(), tensors


def test_the_previous_normaliser_is_held_while_the_ring_fills_and_counted(tiny, held, decode):
    """class_norm="previous": each layer holds its last query's log2-sum-exp per query head while the ring fills
    (the prompt's last query's at first), counted as metadata ("exact" holds none)."""
    caches = {}
    for norm in ("exact", "previous"):
        _, _, caches[norm], _ = decode(tiny, "smartkv", _ids(), 6, "eager", **dict(P, ring_tokens=16, class_norm=norm))
    for layer, other in zip(caches["previous"].layers, caches["exact"].layers, strict=True):
        a = layer._app
        assert a.cimp is not None and a.lse is not None and other._app.lse is None
        assert a.lse.shape == (2, layer.num_heads * layer._group_heads) and bool(a.lse.isfinite().all())
        b = layer.layer_bytes()
        assert sum(held(layer, caches["previous"].layers).values()) == b.payload + b.metadata + b.residual + \
            layer.slack_bytes()


@pytest.mark.parametrize("norm", ["exact", "previous"])
def test_an_append_layer_holds_no_more_than_a_reallocating_one(tiny, decode, norm):
    """Its flush bookkeeping (the ring's and window's counts, the plan's table, device lengths; with
    class_norm="previous" the last query's normaliser) comes out of the prompt's bits, so while the ring fills and
    once it is full the cache holds no more than the default's at the same budget, within a few bytes a layer of
    it."""
    q = dict(P, ring_tokens=16, class_norm=norm)
    for steps in (9, 29):   # the ring fills at step 17
        _, _, app, _ = decode(tiny, "smartkv", _ids(prompt=60), steps, "eager", **q)
        _, _, ref, _ = decode(tiny, "smartkv", _ids(prompt=60), steps, "eager",
                              **dict(q, realloc="incremental", joint=False))
        for a, b in zip(app.memory_report().per_layer, ref.memory_report().per_layer, strict=True):
            held, other = (x["payload"] + x["metadata"] + x["residual"] for x in (a, b))
            assert held <= other and (steps > 17 or held >= other - 400), (steps, held, other)


def test_demotions_every_other_flush_pay_ahead(tiny, held, decode):
    """demote_every=2 with a ring of 4 flushes: flushes 0 and 2 demote (each paying for two flushes), 1 and 3
    nothing, and the classes end as one flush at a time leaves them; the budget holds after every flush and every
    held tensor is counted."""
    q = dict(P, ring_tokens=16)
    ids = _ids(prompt=60)
    ends = {}
    for every in (1, 2):
        _, _, cache, _ = decode(tiny, "smartkv", ids, 1, "eager", **q, demote_every=every)
        layer = cache.layers[0]
        plan, n = layer._app.plan, list(layer._app.n)
        assert [bool(x) for x in plan] == ([True] * 4 if every == 1 else [True, False, True, False]), plan
        for moves in plan:
            layer._apply_moves(n, moves)
        ends[every] = n
    assert ends[1] == ends[2]
    k_budget, v_budget = kv_budgets(4.25, 3)
    for steps in (5, 6, 9, 13, 17):   # the ring's 4 filling flushes run at steps 5, 9, 13, 17
        _, _, eager, _ = decode(tiny, "smartkv", ids, steps, "eager", **q, demote_every=2)
        for layer, lb in zip(eager.layers, eager.memory_report().per_layer):
            assert layer._app.ring_n == 4 * ((steps - 1) // 4)
            assert lb["k_bits"] <= k_budget * lb["k_elements"] + 1e-6
            assert lb["v_bits"] <= v_budget * lb["v_elements"] + 1e-6
            b = layer.layer_bytes()
            assert sum(held(layer, eager.layers).values()) == b.payload + b.metadata + b.residual + \
                layer.slack_bytes()


def test_static_steps_that_demote_every_other_flush_equal_eager_ones(tiny_llama, decode, kernels):
    """Static steps take a "demote" and a "fill" graph variant while the ring fills (demote_every=2: the ring's
    3 filling flushes at steps 5, 9, 13 demote, do not, demote)."""
    q = dict(P, ring_tokens=12, demote_every=2)
    ids = _ids(batch=1, prompt=60).to(next(tiny_llama.parameters()).device)
    _, _, eager, _ = decode(tiny_llama, "smartkv", ids, 14, "eager", **q)
    _, _, static, dec = decode(tiny_llama, "smartkv", ids, 14, "static", **q)
    for a, b in zip(eager.layers, static.layers, strict=True):
        assert a._app.ring_n == b._app.ring_n == 12 and a.n_middle == b.n_middle and a._app.n == b._app.n
        assert torch.equal(_classes_of(a), _classes_of(b))
    dec.close()


@pytest.mark.parametrize("ring", [0, 8])
def test_prompt_tokens_only_go_down_and_every_exit_has_the_mix(tiny, held, ring):
    """The prompt's tokens are all in classes and the ring fills from empty; while it fills the prompt's tokens only
    go down (each kind's width), the budget holds after every step and every held tensor is counted; tokens that
    kept their class keep their codes; once the ring is full nothing moves; each group of 4 that left the ring
    holds the mix's classes in every row; the ring's tokens are its class."""
    cache = smartkv.make_cache("smartkv", tiny, **dict(P, ring_tokens=ring))
    ids = torch.randint(3, 500, (2, 60), generator=torch.Generator().manual_seed(2))
    layer = cache.layers[1]
    k_budget, v_budget = kv_budgets(4.25, 3)
    with torch.inference_mode():
        tiny(ids[:, :30], **cache_kwargs(tiny, cache), use_cache=True)
        a = layer._app
        assert (a.ring, a.ring_n) == (ring, 0)
        n0 = layer.n_middle
        assert sum(a.n) == n0
        bits0 = [layer.level_bits(kind)[..., :n0].clone() for kind in "kv"]
        mid0 = [layer._append_middle(kind)[..., :n0, :].clone() for kind in "kv"]
        for t in range(30, 60):
            tiny(ids[:, t:t + 1], **cache_kwargs(tiny, cache), use_cache=True)
            lb = cache.memory_report().per_layer[1]
            assert lb["k_bits"] <= k_budget * lb["k_elements"] + 1e-6
            assert lb["v_bits"] <= v_budget * lb["v_elements"] + 1e-6
            b = layer.layer_bytes()
            assert sum(held(layer, cache.layers).values()) == b.payload + b.metadata + b.residual + \
                layer.slack_bytes()
            if a.ring_n == ring and t < 59:
                full = [layer.level_bits(kind)[..., :n0].clone() for kind in "kv"]
    assert layer.n_middle == n0 + 28      # 30 more tokens, the window back under 8 + 4 in groups of 4
    assert a.ring_n == ring and (not ring or a.ring_len.tolist() == [ring] * 2)
    assert a.plan is None and a.cimp is None          # nothing left to demote
    bits1 = [layer.level_bits(kind)[..., :n0] for kind in "kv"]
    assert all(bool((x <= y).all()) for x, y in zip(bits1, bits0))
    assert all(torch.equal(x, y) for x, y in zip(bits1, full))          # nothing moved once the ring was full
    assert bool((bits1[0] < bits0[0]).any() or (bits1[1] < bits0[1]).any()) == bool(ring)
    same = (bits1[0] == bits0[0]) & (bits1[1] == bits0[1])
    for kind, before in zip("kv", mid0):
        assert torch.equal(layer._append_middle(kind)[..., :n0, :][same], before[same])
    per_flush = torch.zeros(len(a.widths), dtype=torch.long)
    for cid, m in a.mix:
        per_flush[cid] = m
    exits = 7 - ring // 4
    groups = _classes_of(layer)[..., n0:n0 + 4 * exits].long().reshape(2, layer.num_heads, exits, 4)
    counts = torch.nn.functional.one_hot(groups, len(a.widths)).sum(-2)      # (B, H, flushes, classes)
    assert torch.equal(counts, per_flush.expand_as(counts))
    assert a.n == [int((_classes_of(layer) == c).sum()) // (2 * layer.num_heads)
                   for c in range(len(a.widths))]
    assert a.length[:, 0].tolist() == a.n          # the rows the device writes at are the host's counts
    if ring:
        assert a.ring_k.bits in layer.widths and a.ring_v.bits in layer.widths


def test_demotions_take_the_least_attended_tokens():
    """A filling flush demotes, in each class it takes from, the tokens with the least importance received."""
    cache = make_cache("smartkv", num_layers=1, **dict(P, sensitivity=False, ring_tokens=16))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(1, 2, 60, 32, generator=g), torch.randn(1, 2, 60, 32, generator=g)
    layer.append(k[..., :50, :], v[..., :50, :])
    layer.append(k[..., 50:51, :], v[..., 50:51, :])       # one more (the first call's flush allocated the prompt)
    a = layer._app
    moves = a.plan[0]
    assert moves, "the tiny prompt's plan demotes something at the first filling flush"
    cid, tid, k_n = moves[0]
    pos = layer._cls_positions(cid, a.n[cid])
    light = pos[..., torch.randperm(a.n[cid], generator=g)[:k_n]]      # made the least attended tokens of cid
    for c, n in enumerate(a.n):
        a.cimp[c][..., :n] = 8                       # importance codes: 2^-1 (code 255: nothing received)
    rows = (_classes_of(layer) == cid).long().cumsum(-1).gather(-1, light) - 1
    a.cimp[cid].scatter_(-1, rows, 255)
    layer.append(k[..., 51:55, :], v[..., 51:55, :])
    layer._flush()
    assert bool((_classes_of(layer).gather(-1, light) != cid).all())


def test_a_filling_flush_moves_only_its_lightest_tokens_and_keeps_everything_else():
    """The fixed-shape demotions (buffers with spare rows, counts from the device table): per move exactly the
    planned number of the class's lightest tokens (importance x sensitivity) go to the target, re-quantized from
    their codes there; every other token keeps its class, its codes and its importance code, and moved tokens keep
    theirs; classes stay in position order (the class map's view) and host counts equal the device lengths."""
    cache = make_cache("smartkv", num_layers=1, **dict(P, ring_tokens=16))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(8)
    k, v = torch.randn(2, 2, 90, 32, generator=g), torch.randn(2, 2, 90, 32, generator=g)
    layer.append(k[..., :80, :], v[..., :80, :])
    layer.append(k[..., 80:81, :], v[..., 80:81, :])
    a = layer._app
    layer._append_reserve(6)                                # spare rows past every class's tokens
    n0, B, H = layer.n_middle, 2, layer.num_heads
    imp = torch.randint(0, 120, (B, H, n0), generator=g).to(torch.uint8)   # position order
    for cid, n in enumerate(a.n):
        a.cimp[cid][..., :n] = layer._cls_rows(imp, cid, n)
    cmap0 = _classes_of(layer, n0).clone()
    mid0 = [layer._append_middle(kind) for kind in "kv"]
    ranges = [layer._append_middle(kind).amax(-1) - layer._append_middle(kind).amin(-1) for kind in "kv"]
    w = decode_importance(imp).double()
    w = (w + layer.config.importance_floor * w.mean(-1, keepdim=True)).pow(layer.config.importance_power)
    w = w * layer._sensitivity(*ranges).double()
    moves = a.plan[0]
    assert len(moves) >= 2
    layer.append(k[..., 81:85, :], v[..., 81:85, :])
    layer._flush()                                          # the first filling flush
    cmap1 = _classes_of(layer, n0)
    expect = cmap0.clone()
    for cid, tid, n in moves:                               # the plan's order: a class passes rows before it gets any
        wc = w.masked_fill(expect != cid, float("inf"))
        light = torch.sort(wc, dim=-1, stable=True).indices[..., :n]
        expect.scatter_(-1, light, tid)
    assert torch.equal(cmap1, expect)
    assert a.length[:, 0].tolist() == a.n == [int((cmap1 == c).sum()) // (B * H) for c in range(len(a.widths))]
    same = cmap1 == cmap0
    for kind, j, before in zip("kv", (0, 1), mid0):
        now = layer._append_middle(kind)[..., :n0, :]
        assert torch.equal(now[same], before[same])
        for tid in {t for _, t, _ in moves}:
            at = ~same & (cmap1 == tid)
            want = dequantize(quantize(before[at], a.widths[tid][j], 16, axis=-1))
            torch.testing.assert_close(now[at], want, rtol=0, atol=1e-5)
    for cid, n in enumerate(a.n):                           # importance codes followed their tokens
        assert torch.equal(a.cimp[cid][..., :n], layer._cls_rows(imp, cid, n))


def test_heavier_tokens_get_earlier_classes():
    """Within a flush, the class follows the weight: uniform importance but one token far more attended takes
    the mix's first class in every row."""
    cache = make_cache("smartkv", num_layers=1, **dict(P, sensitivity=False, ring_tokens=0))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g)
    layer.append(k, v)
    layer.append(k[..., :1, :], v[..., :1, :])       # one more (the first call's flush allocated the prompt)
    a = layer._app
    n0 = layer.n_middle
    KVLayer.append(layer, k[..., :3, :], v[..., :3, :])   # stored, not flushed: the test's attention comes first
    a.wimp.fill_(int(encode_importance(torch.tensor(0.01))))
    a.wseen.fill_(10)
    a.wimp[..., 2] = int(encode_importance(torch.tensor(0.5)))   # the flush's third token
    layer._flush()
    first = a.mix[0][0]
    assert bool((_classes_of(layer, n0 + 3)[..., n0 + 2] == first).all())


def test_the_first_allocation_gives_heavier_tokens_wider_classes(monkeypatch):
    """The prompt's first allocation hands out its classes by weight, widest first: along each row's tokens from
    the heaviest, a token's key plus value bits never rise (the order and the rank profile come from one sort,
    `_append_stats`)."""
    cache = make_cache("smartkv", num_layers=1, **dict(P, sensitivity=False, ring_tokens=0))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 64, 32, generator=g), torch.randn(2, 2, 64, 32, generator=g)
    given = {}
    weights = type(layer)._weights

    def distinct(new_k, new_v):   # the layer's weights' shape, distinct random values (no ties)
        w = weights(layer, new_k, new_v)
        given["w"] = torch.rand(w.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.01
        return given["w"]
    monkeypatch.setattr(layer, "_weights", distinct)
    layer.append(k, v)
    a, n = layer._app, layer.n_middle
    bits = torch.tensor([kw + vw for kw, vw in a.widths])[_classes_of(layer, n).reshape(-1, n).long()]
    ranked = bits.gather(1, torch.argsort(given["w"], dim=-1, descending=True))
    assert len(a.widths) >= 2 and bool((ranked[:, 0] > ranked[:, -1]).all())
    assert bool((ranked.diff(dim=-1) <= 0).all())


@pytest.mark.parametrize("ring", [0, 8])
def test_chunked_appends_equal_flush_by_flush(ring):
    """Without a ring, a chunk flushes as its tokens one by one would; with one, a chunk longer than the ring sends
    all but its newest `ring` tokens straight to their classes (no query comes between: quantized once, where one
    by one they pass through the ring's codes first), so the same classes and ring, and less error."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 120, 32, generator=g), torch.randn(2, 2, 120, 32, generator=g)

    def filled(chunks):
        cache = make_cache("smartkv", num_layers=1, **dict(P, ring_tokens=ring))
        layer = cache.layers[0]
        layer.append(k[..., :40, :], v[..., :40, :])
        layer.append(k[..., 40:41, :], v[..., 40:41, :])
        for s in range(41, 120, chunks):
            layer.append(k[..., s:s + chunks, :], v[..., s:s + chunks, :])
        layer._flush()
        return layer
    one, many = filled(1), filled(79)
    for layer in (one, many):   # the rows the device writes at are the host counts
        assert layer._app.length[:, 0].tolist() == layer._app.n
    assert one.n_middle == many.n_middle > 100
    assert torch.equal(_classes_of(one), _classes_of(many))
    end = one.sink_k.shape[-2] + one.n_middle
    for a, b, x in zip(one.stored_kv(), many.stored_kv(), (k, v)):
        if not ring:
            assert torch.equal(a, b)
            continue
        assert torch.equal(a[..., end - ring:, :], b[..., end - ring:, :])   # the ring and the window
        assert (b - x).pow(2).sum() <= (a - x).pow(2).sum()


def test_a_reserved_length_sizes_the_class_buffers_once():
    """`reserve(T)` before a chunked prefill (bench_e2e's fill, a decoder's prompt + new tokens): once T tokens are
    in (and flushed: `append` flushes as attention does), every class buffer holds its tokens and no spare row
    (sized once for T), where growing by a quarter chunk after chunk left about a sixth of the classes' bytes
    unused (17% measured before); the tokens held are the same."""
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(2, 2, 1040, 32, generator=g), torch.randn(2, 2, 1040, 32, generator=g)
    layers = []
    for reserve in (1040, 0):
        layer = make_cache("smartkv", num_layers=1, **dict(P, ring_tokens=16)).layers[0]
        layer.reserve(reserve)
        for s in range(0, 1000, 200):
            layer.append(k[..., s:s + 200, :], v[..., s:s + 200, :])
        for s in range(1000, 1040):
            layer.append(k[..., s:s + 1, :], v[..., s:s + 1, :])
        layers.append(layer)
    sized, grown = layers
    a = sized._app
    assert [q.codes.shape[-2] - n for q, n in zip(a.k, a.n)] == [0] * len(a.n)
    # the window's buffers keep their room for one flush's tokens across flushes (`_window_drop`): not the classes'
    room = 0 if a.wbuf is None else sum(t.numel() * t.element_size() for t in a.wbuf[:4]) - sum(
        t.numel() * t.element_size() for t in (sized.win_k, sized.win_v, a.wimp, a.wseen))
    assert sized.slack_bytes() - room < 0.01 * sum(dataclasses.astuple(sized.layer_bytes())[:3])
    assert grown.slack_bytes() > 5 * (sized.slack_bytes() - room)
    assert sized._app.n == grown._app.n
    for a, b in zip(sized.stored_kv(), grown.stored_kv()):
        assert torch.equal(a, b)


@pytest.fixture
def kernels(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(cache_mod, "FORCE_KERNELS", True)


@pytest.mark.parametrize("norm", ["exact", "previous"])
def test_fused_and_static_steps_equal_the_reference_path(tiny_llama, kernels, decode, norm):
    """On the GPU when there is one (fp16 operands: the bounds of test_graphs). Measured on CPU (interpreter): fused
    vs reference logits 1.4e-4 relative, static vs fused 0 (the same kernel calls). class_norm="previous": the
    class rows' importance folded in the attention pass, as the reference path folds it."""
    dev = next(tiny_llama.parameters()).device
    bound, rtol = (2e-3, 1e-2) if dev.type == "cuda" else (6e-4, 1e-3)
    ids = _ids().to(dev)
    q = dict(P, class_norm=norm)
    ref_tokens, ref_logits, ref, _ = decode(tiny_llama, "smartkv", ids, 12, "eager", **q, use_kernels=False)
    tokens, logits, fused, _ = decode(tiny_llama, "smartkv", ids, 12, "eager", **q)
    s_tokens, s_logits, static, dec = decode(tiny_llama, "smartkv", ids, 12, "static", **q)
    assert torch.equal(tokens, ref_tokens) and torch.equal(s_tokens, ref_tokens)
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < bound
    assert ((s_logits - logits).abs().max() / logits.abs().max()).item() < bound
    for caches in ((fused, ref), (static, fused)):
        for a, b in zip(*(c.layers for c in caches), strict=True):
            assert a.n_middle == b.n_middle == 30 and a._app.n == b._app.n
            assert torch.equal(_classes_of(a), _classes_of(b))
            assert (a._app.wimp.int() - b._app.wimp.int()).abs().max() <= 1   # codes: steps of 9%
            assert torch.equal(a._app.wseen, b._app.wseen)
    assert static.memory_report().total_bytes == fused.memory_report().total_bytes
    assert dec.cache.static_variant() in ((None, None), ("flush", "flush"))
    dec.close()
    assert static.memory_report() == fused.memory_report()


def test_the_window_is_one_stable_segment_with_the_same_results(tiny_llama, kernels, decode, monkeypatch):
    """An ordinary step passes the window as a stable segment over buffers with room, its length on the device
    (decode_attention keeps it in the batched table, no row copied a step): the same object step after step until
    a flush, and the same tokens, logits and state as the window passed as a new segment each step."""
    from smartkv.kernels import batched
    dev = next(tiny_llama.parameters()).device
    ids = _ids().to(dev)
    seen, call = [], batched.call

    def recorded(g, segments, *args, **kwargs):
        out = call(g, segments, *args, **kwargs)
        seen.append((segments[-1], out.tail is None))
        return out

    monkeypatch.setattr(batched, "call", recorded)
    runs = {}
    for stable in ("0", "1"):
        monkeypatch.setenv("SMARTKV_STABLE_WINDOW", stable)
        seen.clear()
        tokens, logits, cache, _ = decode(tiny_llama, "smartkv", ids, 8, "eager", **P)
        runs[stable] = tokens, logits, cache, list(seen)
    tokens, logits, cache, calls = runs["1"]
    assert torch.equal(tokens, runs["0"][0]) and torch.equal(logits, runs["0"][1])
    for a, b in zip(cache.layers, runs["0"][2].layers, strict=True):
        assert torch.equal(a.win_k, b.win_k) and torch.equal(a._app.wimp, b._app.wimp)
        assert torch.equal(a._app.wseen, b._app.wseen)
    assert calls and all(no_tail for _, no_tail in calls)   # the window a row of the kept table
    assert not any(no_tail for _, no_tail in runs["0"][3])
    windows = [w for w, _ in calls]
    assert all(w.stable and w.lengths is not None for w in windows)
    # one object a window buffer: far fewer than the steps (a buffer lasts from one flush to the next)
    assert len({id(w) for w in windows}) < len(windows) // 2


def test_the_batched_tables_outlive_the_flushes(tiny_llama, kernels, decode):
    """An ordinary step's sinks, classes and ring are the same segments from the first step on while the buffers
    hold the decode's reserved length (the ring's among them before its first token, its length 0 on the device):
    each layer builds its batched table at its first step, once more at the first step of a full ring (the class
    rows are no longer observed: another launch), and at no flush (one built again after the ring's first flush cost
    the step after it ~11 ms of the H100 host's time a request)."""
    from smartkv.kernels import batched
    ids = _ids().to(next(tiny_llama.parameters()).device)
    before = batched.STATS["tables"]
    _, _, cache, dec = decode(tiny_llama, "smartkv", ids, 1, "eager", reserve=ids.shape[1] + 16, **P)
    built, full = [batched.STATS["tables"] - before], []
    nxt = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    a = cache.layers[0]._app
    for _ in range(15):   # 4 flushes: the ring's two filling ones, then two of the full ring
        full.append(a.ring_n == a.ring)
        before = batched.STATS["tables"]
        dec.step(nxt)
        built.append(batched.STATS["tables"] - before)
    L = len(cache.layers)
    assert cache.layers[0].n_middle > a.ring and full.count(False) > 4   # both filling flushes seen
    assert built == [L] + [L if now and not was else 0 for was, now in zip([False] + full, full)]
    dec.close()


def test_probabilities_of_some_segments_equal_those_of_all():
    """decode_attention with a None entry in probs_out skips that segment's probabilities; the rest are those of
    the full call (on whichever path this machine takes: CUDA, Triton, or the reference)."""
    from smartkv.core.quant import quantize
    from smartkv.kernels import KVSegment, decode_attention
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(2, 2, 96, 128, generator=g), torch.randn(2, 2, 96, 128, generator=g)
    q = torch.randn(2, 8, 128, generator=g).to(dev, torch.float16)
    k, v = k.to(dev, torch.float16), v.to(dev, torch.float16)
    segs = [KVSegment(quantize(k[..., :64, :].float(), 4, 64, -1), quantize(v[..., :64, :].float(), 2, 64, -1)),
            KVSegment(k[..., 64:, :], v[..., 64:, :])]
    out_all, probs = decode_attention(q, segs, 0.1, return_token_probs=True)
    window = torch.zeros(2, 2, 32, device=dev)
    out, some = decode_attention(q, segs, 0.1, return_token_probs=True, probs_out=[None, window])
    assert some[0] is None and some[1] is window
    torch.testing.assert_close(out, out_all, rtol=0, atol=0)
    torch.testing.assert_close(window, probs[1], rtol=1e-5, atol=1e-6)
    assert 0.05 < float(window.sum()) / (2 * 2 * 4) < 0.95     # the window holds part of the mass, not all


def test_a_layer_without_the_kernels_runs_no_triton_kernel(tiny, monkeypatch):
    """A layer that does not use the kernels (CPU tensors without FORCE_KERNELS, or use_kernels=False) stores,
    flushes, demotes and attends in torch, the kernels module's helpers included (kernels.torch_only): under the
    interpreter (these tests) append's prompt was quantized by interpreted kernels, 10x the whole fill's time."""
    from smartkv import kernels
    if not kernels.interpreting():
        pytest.skip("counts the interpreter's launches (a CPU test session)")
    import triton.runtime.interpreter as interp
    calls, run = [], interp.InterpretedFunction.run
    monkeypatch.setattr(interp.InterpretedFunction, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    ids = _ids(prompt=24)

    def decode(steps=10, **params):
        calls.clear()
        cache = make_cache("smartkv", tiny, **P, **params)
        with torch.inference_mode():
            out = tiny(ids, **cache_kwargs(tiny, cache), use_cache=True)
            for _ in range(steps):   # across flushes and the ring's demotions
                out = tiny(out.logits[:, -1:].argmax(-1), **cache_kwargs(tiny, cache), use_cache=True)
        return len(calls)

    assert decode() == 0 and decode(use_kernels=False) == 0
    monkeypatch.setattr(cache_mod, "FORCE_KERNELS", True)
    assert decode(steps=1) > 0   # the kernels' own tests still run them


def test_every_kernel_launch_can_go_straight_to_the_compiled_kernel(tiny_llama, kernels, decode):
    """Every launch of an append cache's prefill, steps and filling flushes (and int4's) passes a tuple grid and its
    constexprs by keyword, which `kernels.launch` needs to send a call straight to the compiled kernel: a constexpr
    passed positionally sent every call through Triton's binding (the demotions' row moves: ~50 us more host time a
    launch on the GPU host, where an eager step is bound by host work)."""
    import inspect

    import smartkv.kernels.launch as launch_mod

    inner, seen = launch_mod.launch, set()

    def checked(fn, grid, *args, **meta):
        names = list(inspect.signature(fn.fn).parameters.items())
        constexpr = [name for name, p in names[:len(args)] if "constexpr" in str(p.annotation)]
        assert not callable(grid) and not constexpr, (fn.fn.__name__, constexpr)
        seen.add(fn.fn.__name__)
        return inner(fn, grid, *args, **meta)

    ids = _ids(batch=1).to(next(tiny_llama.parameters()).device)
    with launch_mod.routed(checked):
        decode(tiny_llama, "smartkv", ids, 12, "eager", **P)
        decode(tiny_llama, "int4", ids, 2, "eager")
    assert {"_move_many_kernel", "_requant_kernel", "_keys_kernel", "_quant_tok_kernel"} <= seen, seen


def test_class_buffers_are_views_of_one_block_that_growth_replaces_whole():
    """A first allocation's class buffers are views of one zeroed block (arena.py), each 16-byte aligned; a class that
    outgrows its buffers moves every class into one new block (no view of the old block is left to keep it), its
    rows the same; the importance codes while the ring fills share a block of their own."""
    from smartkv.methods.smartkv.arena import carve, padding

    views = carve([((2, 3), torch.uint8), ((5,), torch.float16), ((1, 3), torch.int32)], "cpu")
    assert all(v.data_ptr() % 16 == 0 and not v.any() for v in views)
    assert views[0].untyped_storage().data_ptr() == views[2].untyped_storage().data_ptr()
    assert padding(views) == 48 - (6 + 10 + 12)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 200, 32, generator=g), torch.randn(1, 2, 200, 32, generator=g)
    layer = make_cache("smartkv", num_layers=1, **dict(P, ring_tokens=64)).layers[0]
    layer.append(k[..., :160, :], v[..., :160, :])
    a = layer._app
    blocks = {t.untyped_storage().data_ptr() for q in a.k + a.v for t in (q.codes, q.scale, q.zero)}
    imps = {t.untyped_storage().data_ptr() for t in a.cimp}
    assert len(blocks) == 1 and len(imps) == 1 and blocks != imps
    before = [q.codes[..., :n, :].clone() for q, n in zip(a.k, a.n)]
    caps = [q.codes.shape[-2] for q in a.k]
    layer._append_reserve(40)   # forty flushes ahead: past every class's room
    grown = {t.untyped_storage().data_ptr() for q in a.k + a.v for t in (q.codes, q.scale, q.zero)}
    assert len(grown) == 1 and grown != blocks and [q.codes.shape[-2] for q in a.k] != caps
    assert len({t.untyped_storage().data_ptr() for t in a.cimp}) == 1
    for old, q, n in zip(before, a.k, a.n):
        assert torch.equal(old, q.codes[..., :n, :])
