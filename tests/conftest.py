"""Shared fixtures. Runner tests: one Ray instance per session (2 CPUs, loopback), the fake worker, grid files."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at the first import of smartkv.kernels,
# whichever test module does it first: without a GPU the whole session runs kernels in the interpreter.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

if os.environ.get("TRITON_INTERPRET") == "1":
    from _interpreter import install
    if not install():   # the interpreted kernel tests then take about twice as long (tests/_interpreter.py)
        import warnings
        warnings.warn("tests/_interpreter.py: this Triton's interpreter is not the one it patches; kernels run "
                      "unpatched, slower", stacklevel=1)

# Ray reads this once at import: a local instance then binds to 127.0.0.1 only (see executor.LOOPBACK_ENV).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

FAKE_WORKER = "smartkv.bench.run.fake_worker:run_job"

TINY_GRID = """\
name: {name}
models: [tiny-llama]
methods:
  fp16: {{}}
  int4: {{}}
  smartkv: {{budget: [3, 4]}}
prompt_sets:
  passkey: {{length: 256, num_samples: 2}}
  prose-ppl: {{length: 128, num_samples: 2}}
"""


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 CPUs, no dashboard, loopback only."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 namespace="smartkv-bench-tests")
    yield ray
    ray.shutdown()


@pytest.fixture
def fake_worker(tmp_path, monkeypatch) -> Path:
    """Use the fake worker (in-process and in Ray actors); returns its fault-order directory."""
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("SMARTKV_BENCH_WORKER", FAKE_WORKER)
    monkeypatch.setenv("SMARTKV_FAKE_FAULT_DIR", str(faults))
    monkeypatch.setenv("SMARTKV_FAKE_SLEEP_S", "0")
    return faults


@pytest.fixture
def write_grid(tmp_path):
    """write_grid(text, name="g.yaml") -> path of a grid file under tmp_path/grids."""
    folder = tmp_path / "grids"
    folder.mkdir(exist_ok=True)

    def write(text: str, name: str = "g.yaml") -> Path:
        path = folder / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def tiny_grid(write_grid) -> Path:
    """8 jobs on tiny-llama: fp16, int4, smartkv budget 3/4 x passkey, prose-ppl."""
    return write_grid(TINY_GRID.format(name="tiny"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: a second intra-op thread gains nothing and, on a busy shared
    machine, costs ten times. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama():
    """A random tiny Llama (head_dim 32, 4 query / 2 KV heads, 2 layers, seed 0) on the GPU when there is one; one
    per test module, so a module's graphs and hooks stay its own."""
    import torch

    from smartkv.models import load_tiny

    return load_tiny("tiny-llama", seed=0, device="cuda" if torch.cuda.is_available() else "cpu").model


# Attributes holding tensors that are no cache state (the same bytes at any length), left out of held_tensors:
CONSTANT_ATTRIBUTES = ("_width_values",)   # SmartKV: level index -> width lookup, len(widths) int64
# and references to the layer's peers, not its state: SmartKV's first-allocation group holds the cache's layers
SHARED_ATTRIBUTES = ("_first_group",)


def held_tensors(obj, among: list | None = None) -> dict[str, int]:
    """Bytes of every storage the tensors reachable from `obj` live in, by the attribute path that first reaches it.

    Walks attributes of smartkv objects (cache, layers, buffers, QTensors, dataclasses) and lists, tuples and dicts,
    so a tensor a layer holds is found whatever its name. Views share their base's storage and are counted once, at
    the storage's full size: what the cache keeps allocated, not what its accounting says it uses. `among`: objects
    (a cache's layers) that may share storages, as a SmartKV group's first allocation places its layers' buffers in
    one block: a storage reached from k of them counts 1/k of its bytes (each share must come out whole)."""
    if among is not None:
        reach = [_storages(x) for x in among]
        out = {}
        for key, (path, nbytes) in _storages(obj).items():
            k = sum(key in r for r in reach)
            assert nbytes % k == 0, (path, nbytes, k)
            out[path] = nbytes // k
        return out
    return dict(_storages(obj).values())


def _storages(obj) -> dict:
    """{(device, storage address): (the first attribute path reaching it, its bytes)} of `held_tensors`' walk."""
    import torch

    found: dict[tuple, tuple[str, int]] = {}
    visited: set[int] = set()

    def walk(x, path: str) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.nbytes():
                found.setdefault((str(x.device), storage.data_ptr()), (path, storage.nbytes()))
            return
        if id(x) in visited:
            return
        visited.add(id(x))
        if isinstance(x, dict):
            for key, value in x.items():
                walk(value, f"{path}[{key!r}]")
        elif isinstance(x, (list, tuple)):
            for i, value in enumerate(x):
                walk(value, f"{path}[{i}]")
        elif type(x).__module__.startswith("smartkv") and hasattr(x, "__dict__"):
            for name, value in vars(x).items():
                if name not in CONSTANT_ATTRIBUTES + SHARED_ATTRIBUTES:
                    walk(value, f"{path}.{name}")

    walk(obj, type(obj).__name__)
    return found


def greedy_decode(model, method, ids, steps, mode, reserve=None, **params):
    """Greedy tokens and per-step logits of `steps` GraphDecoder steps (`mode`: eager / static / graph) after the
    prompt `ids`, with the cache and the decoder: (tokens (B, steps), logits (steps, B, V) fp32, cache, decoder)."""
    import torch

    import smartkv
    from smartkv.cache.graphs import GraphDecoder
    from smartkv.cache.hf_compat import cache_kwargs

    cache = smartkv.make_cache(method, model, **params)
    with torch.inference_mode():
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:]
    dec = GraphDecoder(model, cache, max_length=reserve or ids.shape[1] + steps, mode=mode)
    tokens, all_logits = [], []
    for _ in range(steps):   # GraphDecoder.step runs in inference mode itself
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = dec.step(nxt)
        all_logits.append(logits[:, -1].float())
    return torch.cat(tokens, 1), torch.stack(all_logits), cache, dec


@pytest.fixture
def decode():
    """decode(model, method, ids, steps, mode, reserve=None, **params): see greedy_decode."""
    return greedy_decode


@pytest.fixture
def held():
    """held(obj, among=None) -> {attribute path: bytes} of the storages reachable from obj (see held_tensors)."""
    return held_tensors
