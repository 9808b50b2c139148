"""Where the stacked demotions' path and each layer's own part on a GPU (tests/test_stacked.py's model and steps).

    python benchmarks/stacked_diag.py 1:0:32 0:0:32       # A:B:STEPS, each flag's run; B@S: B's run allocates at step S
    python benchmarks/stacked_diag.py --outputs 31        # each module's output at that step's forward, 1 against 0
    TRITON_INTERPRET=1 python benchmarks/stacked_diag.py --kernels 1:0:32   # the kernels' path on the CPU (~4 min)

Each pair prints the first step whose logits differ, their largest difference, and the state entries
(test_first_group._used) that differ after the last step. --outputs compares every layer's norm, projections,
attention and MLP outputs in one forward. On the CPU's reference path both agree bit for bit; the kernels' path
(on a GPU, or --kernels) differs at the flush that fills the ring by rounding (tests/test_stacked.py says why)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]
import test_stacked   # noqa: E402
from test_first_group import _same, _used   # noqa: E402
from smartkv.models import load_tiny   # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn",
           "self_attn.o_proj", "mlp")


def model_five():
    """test_first_group's `five` fixture."""
    model = load_tiny("tiny-llama", num_hidden_layers=5, device=DEV).model
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            block.self_attn.q_proj.weight *= 1 + 3 * i
    return model


def decode(model, flag: str, steps: int, hook=None):
    with pytest.MonkeyPatch.context() as patches:   # the test's fixture, outside pytest
        return test_stacked._decode(model, patches, flag, steps, hook=hook)


def pair(model, spec: str) -> str:
    a, b, steps = spec.split(":")
    keep, hook = [], None
    if "@" in b:   # the allocator's layout moved at that step: does the rounding follow memory addresses?
        b, at = b.split("@")
        hook = (int(at), lambda cache: keep.extend(torch.empty(n, dtype=torch.uint8, device=DEV)
                                                   for n in (37, 1000, 5000)))
    c1, l1, _ = decode(model, a, int(steps))
    c0, l0, _ = decode(model, b, int(steps), hook)
    d = (l1.float() - l0.float()).abs().amax(-1).amax(-1)
    first = next((i for i in range(len(d)) if d[i] > 0), None)
    bad = []
    for li, (x1, x0) in enumerate(zip(c1.layers, c0.layers)):
        for j, (x, y) in enumerate(zip(_used(x1), _used(x0))):
            if not _same(x, y):
                both = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                bad.append(f"L{li}#{j}" + (f":{int((x != y).sum())} el, max {(x.float() - y.float()).abs().max():.3g}"
                                           if both else ""))
    return f"{spec}: first logits differing at step {first}, max {d.max():.3g}; state entries differing: {bad}"


def outputs(model, flag: str, at: int) -> list:
    rec, on, hooks = [], [False], []
    for i, block in enumerate(model.model.layers):
        for name in MODULES:
            def grab(_m, _inp, out, tag=f"L{i}.{name}"):
                if on[0]:
                    rec.append((tag, (out[0] if isinstance(out, tuple) else out).detach().float().clone()))
            hooks.append(block.get_submodule(name).register_forward_hook(grab))
    try:
        decode(model, flag, at + 1, hook=(at, lambda cache: on.__setitem__(0, True)))
    finally:
        for h in hooks:
            h.remove()
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="*", help="A:B:STEPS (flags 0/1; B@S allocates at step S in B's run)")
    p.add_argument("--outputs", type=int, default=None, help="a step: each module's output there, 1 against 0")
    p.add_argument("--kernels", action="store_true", help="on the CPU, the kernels' path (TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.kernels:
        import smartkv.cache.layer as cache_layer
        cache_layer.FORCE_KERNELS = True
    model = model_five()
    for spec in args.pairs:
        print(pair(model, spec), flush=True)
    if args.outputs is not None:
        got, want = outputs(model, "1", args.outputs), outputs(model, "0", args.outputs)
        print(" ".join(f"{t}:{(x - y).abs().max():.2g}" for (t, x), (_, y) in zip(got, want)))


if __name__ == "__main__":
    main()
