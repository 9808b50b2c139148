"""The caches on the embedded model (SmolLM2-135M-Instruct) reading real prose."""
import pydoc_data.topics
import pytest
import torch
from transformers import DynamicCache

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def prose_ids(smol):
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    return smol.tokenizer(text, return_tensors="pt")["input_ids"][:, 2000:2600]


# whole-bit widths over a finite number of tokens (within one bit a layer in all, <= 0.01 bits here), and append's
# bookkeeping (counts, the filling flushes' table) charged to the prompt's bits (0.011 bits at 600 tokens)
BUDGET_SLACK = 0.03


def _fill(model, method, ids, steps=8, **params):
    cache = smartkv.make_cache(method, model, **params)
    with torch.inference_mode():
        model(ids[:, :-steps], **cache_kwargs(model, cache), use_cache=True)
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            model(ids[:, t:t + 1], **cache_kwargs(model, cache), use_cache=True)
    return cache


def test_fp16_equals_dynamic_cache(smol, prose_ids):
    ids = prose_ids[:, :300]
    with torch.inference_mode():
        ref = smol.model.generate(ids, **cache_kwargs(smol.model, DynamicCache()), max_new_tokens=20, do_sample=False)
        got = smol.model.generate(ids, **cache_kwargs(smol.model, smartkv.make_cache("fp16", smol.model)),
                                  max_new_tokens=20, do_sample=False)
        ref_logits = smol.model(ids, **cache_kwargs(smol.model, DynamicCache())).logits
        got_logits = smol.model(ids, **cache_kwargs(smol.model, smartkv.make_cache("fp16", smol.model))).logits
    assert torch.equal(got, ref)
    assert torch.equal(got_logits, ref_logits)


def _rel_errors(smol, prose_ids, method, **params):
    ref = _fill(smol.model, "fp16", prose_ids)
    cache = _fill(smol.model, method, prose_ids, **params)
    errs = []
    for layer in range(len(cache.layers)):
        rk, rv = ref.stored_kv(layer)
        k, v = cache.stored_kv(layer)
        errs.append(((k.float() - rk.float()).norm() / rk.float().norm()
                     + (v.float() - rv.float()).norm() / rv.float().norm()).item() / 2)
    return sum(errs) / len(errs), cache


def test_reconstruction_error_ordering(smol, prose_ids):
    err = {m: _rel_errors(smol, prose_ids, m)[0] for m in ("fp16", "int8", "int4", "smartkv")}
    assert err["fp16"] == 0.0
    assert err["fp16"] < err["int8"] < err["smartkv"] < err["int4"], err


def test_payload_ratios_reproduce_the_validation_table(smol, prose_ids):
    """Payload ratios of the validation table; total ratios from each layout (codes, then an fp16 scale and zero per
    group of 32; KIVI's residual windows at 16 bits); SmartKV's payload is its default budget's."""
    T = prose_ids.shape[1]
    n_k, n_v = T // 128 * 128, T - 128    # KIVI: keys quantized in whole blocks of R = 128, values but the last R
    kivi_total = (n_k * (2 + 1) + n_v * (4 + 1) + (2 * T - n_k - n_v) * 16) / (2 * T * 16)
    expected = {"int8": (0.5, 9 / 16), "int4": (0.25, 5 / 16), "kivi": (0.1875, kivi_total)}
    for method, (payload, total) in expected.items():
        report = _fill(smol.model, method, prose_ids).memory_report()
        assert report.payload_ratio == pytest.approx(payload), method
        assert report.total_ratio == pytest.approx(total, rel=1e-9), method
    report = _fill(smol.model, "smartkv", prose_ids).memory_report()
    budget = smartkv.method_fields("smartkv")["budget"]
    assert budget - BUDGET_SLACK <= report.avg_bits <= budget
    assert report.payload_ratio == pytest.approx(report.avg_bits / 16)


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0, 5.5, 8.0])
def test_smartkv_meets_its_budget(smol, prose_ids, budget):
    report = _fill(smol.model, "smartkv", prose_ids, budget=budget).memory_report()
    assert budget - BUDGET_SLACK <= report.avg_bits <= budget + 1e-9
