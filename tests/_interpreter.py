"""Triton's interpreter without its repeated language patching (CPU test sessions only).

Under TRITON_INTERPRET=1 every launch patches triton.language's builtins to their interpreted forms
(`interpreter._patch_lang`: `inspect.getmembers` over tl, tl.tensor and tl.math, ~1 ms) and undoes it after the grid.
Every call of a @triton.jit helper from inside a kernel patches again (never undone), though the enclosing launch
has patched the same modules already: the helpers' calls then hold a third or more of an interpreted kernel's time
(cProfile of test_append's fused-steps test: 76K nested patchings, 72 of 195 s). `install` skips a nested patching
when the launch around it, or an earlier helper in it, has patched every language module the helper's globals name;
anything else (a launch's own, a helper reached outside a launch, the first helper to name a module) takes Triton's
path. Kernels compute the same either way: a patched builtin is no longer a builtin to Triton, so patching again
changes nothing.
"""
from __future__ import annotations

_patched = {"langs": frozenset()}   # the modules the running launch has patched (empty between launches)
_LANGS: dict = {}


def _langs(fn) -> frozenset:
    """The language modules `_patch_lang` would patch for fn (the same selection as Triton's), once a function."""
    found = _LANGS.get(fn)
    if found is None:
        import triton.language as tl
        found = _LANGS[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
    return found


def install() -> bool:
    """Patch the interpreter in this process; False (and nothing changed) if its internals are not the expected
    (True without Triton: no kernel is interpreted)."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return True
    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction")
    if getattr(ti, "_smartkv_fast", False):
        return True
    if not all(hasattr(ti, name) for name in needed):
        return False
    patch_lang = ti._patch_lang

    def patched(fn):
        langs, inside = _langs(fn), bool(_patched["langs"])   # Triton asserts a launch names a module
        if inside and langs <= _patched["langs"]:
            return ti._LangPatchScope()   # nothing to undo: the enclosing launch restores its own
        scope = patch_lang(fn)
        # inside a launch: a helper naming a module the launch has not patched (triton.language.standard's tl.sum,
        # tl.zeros name `core`), patched from here on as Triton leaves it; else the launch's own patching
        # (GridExecutor.__call__), remembered until its scope is restored
        _patched["langs"] |= langs
        if not inside:
            restore = scope.restore

            def restored():
                _patched["langs"] = frozenset()
                restore()
            scope.restore = restored
        return scope

    ti._patch_lang = patched
    ti._smartkv_fast = True
    return True
