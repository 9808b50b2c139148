"""Decode attention through the CUDA C++ kernels of `cuda_attn.cu`: codes unpacked in registers straight into
tensor-core operands, one 32-token stage after another through a per-warp cp.async ring (the file's header says
how). The fast path of `decode_attention` on CUDA; `unsupported` says when it does not apply and why (then the
Triton kernels run). Launch shape and the size below which Triton takes the call: `tuning.current().cuda`.

Compiled at first use, one configuration (head_dim, key kind and widths, launch shape) at a time, by NVRTC (the
libnvrtc that PyTorch's CUDA wheels ship, found next to them; SMARTKV_NVRTC names another), loaded and launched
through the CUDA driver API with ctypes: no build step, no extra package. A compile takes 1-3 s; the
CUBIN is cached under ~/.cache/smartkv/cuda (SMARTKV_CACHE_DIR). SMARTKV_FAST_ATTN=0 turns the path off.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from smartkv.core.quant import QTensor
from smartkv.kernels import tuning
from smartkv.kernels.segment import KVSegment

log = logging.getLogger("smartkv.kernels")
SOURCE = Path(__file__).with_name("cuda_attn.cu")
LOG2E = 1.4426950408889634
TILE, HMAX, GS = 32, 8, 32   # tokens per stage, query heads per KV head at most, quantization group
MAX_TAIL = 1024              # tokens after the quantized part handled by the plain tail warps
STAGE_OVERHEAD = 2.0         # a warp's fixed cost (query set-up, combine) in stages, for the split planner
PATHS: Counter = Counter()   # "fast" or the reason a call took the Triton path (benchmarks, tests)

F_LEN, F_LEN64, F_RESLAST, F_KAFF, F_QBF16, F_KRBF16, F_VRBF16, F_KABF16, F_MERGE = 1, 2, 4, 8, 16, 32, 64, 128, 256
F_SCORES, F_FOLD = 512, 1024
_I64, _P, _F, _I = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int32


class Params(ctypes.Structure):
    """`struct Params` of cuda_attn.cu, field for field."""
    _fields_ = [("q", _P), ("sqb", _I64), ("sqh", _I64),
                ("kq", _P), ("skqb", _I64), ("skqh", _I64), ("skqt", _I64),
                ("ks", _P), ("kz", _P), ("sksb", _I64), ("sksh", _I64), ("skst", _I64),
                ("kr", _P), ("skrb", _I64), ("skrh", _I64), ("skrt", _I64),
                ("vq", _P), ("svqb", _I64), ("svqh", _I64), ("svqt", _I64),
                ("vs", _P), ("vz", _P), ("svsb", _I64), ("svsh", _I64), ("svst", _I64),
                ("vr", _P), ("svrb", _I64), ("svrh", _I64), ("svrt", _I64),
                ("ka", _P), ("kb", _P), ("skab", _I64), ("skah", _I64),
                ("len", _P),
                ("op", _P), ("lp", _P), ("sob", _I64), ("soh", _I64), ("sos", _I64), ("slb", _I64), ("slh", _I64),
                ("out", _P), ("cnt", _P), ("sxb", _I64), ("sxh", _I64),
                ("sc", _P), ("sscb", _I64), ("ssch", _I64),
                ("fc", _P), ("fcb", _I64), ("fch", _I64), ("fseen", _P), ("flp", _P),
                ("qk_scale", _F),
                ("seg_offset", _I), ("t_seg", _I), ("tk", _I), ("tv", _I), ("h_kv", _I), ("ng", _I),
                ("chunk", _I), ("tail_w", _I), ("split0", _I), ("s_total", _I), ("flags", _I)]


def smem_bytes(D: int, kkind: int, kb: int, vb: int, nw: int = 4, stages: int = 2, sg: int = GS) -> int:
    """Dynamic shared memory of one block: cuda_attn.cu's SMEM_BYTES for that configuration."""
    def pad(w, mod, rem):
        return w + (rem - w) % mod
    krow, vrow, ngrp = D * kb // 8, D * vb // 8, D // GS
    kpadw = krow // 4 if kkind == 2 else (pad(krow // 4, 16, 8) if kb == 8 else pad(krow // 4, 8, 4))
    vpadw = pad(vrow // 4, 8, 4)
    srow = D // sg * 2
    kmeta = D * 2 if kkind == 2 else TILE * srow
    stage = TILE * kpadw * 4 + TILE * vpadw * 4 + 2 * kmeta + 2 * TILE * srow
    stage = -(-stage // 16) * 16
    warp = max(stages * stage, 2 * (HMAX * D + 2 * HMAX) * 4)
    q = -(-((HMAX * D + HMAX * ngrp + 2 * HMAX + nw + (8 * D if kkind == 2 else 0)) * 4) // 16) * 16
    return q + nw * warp


# ---------------------------------------------------------------- NVRTC and the driver, through ctypes
def _find_nvrtc() -> ctypes.CDLL:
    names = [os.environ["SMARTKV_NVRTC"]] if os.environ.get("SMARTKV_NVRTC") else []
    try:
        import nvidia  # the CUDA wheels PyTorch depends on
        for root in nvidia.__path__:
            names += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")), reverse=True)
    except ImportError:
        pass
    names += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for name in names:
        if "builtins" in name or ".alt." in name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        for builtins in glob.glob(os.path.join(os.path.dirname(name), "libnvrtc-builtins.so*")):
            try:  # NVRTC opens its builtins by name at compile time: loaded here it finds them
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue
        return lib
    raise RuntimeError("libnvrtc not found (install PyTorch's CUDA wheels, or set SMARTKV_NVRTC to its path)")


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    lib = _find_nvrtc()
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


@functools.cache
def _cuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    for name in ("cuModuleLoadData", "cuModuleGetFunction", "cuFuncSetAttribute", "cuLaunchKernel",
                 "cuOccupancyMaxActiveBlocksPerMultiprocessor", "cuFuncGetAttribute"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _check(res: int, what: str) -> None:
    if res:
        msg = ctypes.c_char_p()
        _cuda().cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {res} ({(msg.value or b'').decode()})")


def nvrtc_compile(source: str, options: Sequence[str]) -> bytes:
    """CUBIN of `source` (NVRTC), cached on disk by source, options and NVRTC version."""
    lib = _nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    key = hashlib.sha256("\0".join([source, *options, f"{major.value}.{minor.value}"]).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("SMARTKV_CACHE_DIR", Path.home() / ".cache" / "smartkv" / "cuda"))
    path = cache / f"{key}.cubin"
    if path.exists():
        return path.read_bytes()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"cuda_attn.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [o.encode() for o in options]
    try:
        res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if res:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            raise RuntimeError(f"NVRTC: {lib.nvrtcGetErrorString(res).decode()}\n{buf.value.decode()[:2000]}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        image = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, image)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(image.raw)
        tmp.replace(path)
    except OSError:
        pass
    return image.raw


def options(arch: str, D: int, kkind: int, kb: int, vb: int, nw: int = 4, stages: int = 2, minb: int = 1,
            ladder: int = 3, sg: int = GS) -> list[str]:
    return [f"--gpu-architecture=sm_{arch}", "-std=c++17", f"-DSK_D={D}", f"-DSK_KKIND={kkind}", f"-DSK_KB={kb}",
            f"-DSK_VB={vb}", f"-DSK_NW={nw}", f"-DSK_STAGES={stages}", f"-DSK_MINB={minb}", f"-DSK_LADDER={ladder}",
            f"-DSK_SG={sg}"]


class Kernels:
    """The split and merge kernels of one configuration, loaded on one device."""

    def __init__(self, device: int, D: int, kkind: int, kb: int, vb: int, nw: int, stages: int, minb: int,
                 ladder: int = 3, sg: int = GS):
        major, minor = torch.cuda.get_device_capability(device)
        self.nw, self.D = nw, D
        self.smem = smem_bytes(D, kkind, kb, vb, nw, stages, sg)
        image = nvrtc_compile(SOURCE.read_text(),
                              options(f"{major}{minor}", D, kkind, kb, vb, nw, stages, minb, ladder, sg))
        cu = _cuda()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # the primary context, current on this thread
            self._image = ctypes.create_string_buffer(image)
            self.module = ctypes.c_void_p()
            _check(cu.cuModuleLoadData(ctypes.byref(self.module), self._image), "cuModuleLoadData")
            self.split, self.merge = ctypes.c_void_p(), ctypes.c_void_p()
            _check(cu.cuModuleGetFunction(ctypes.byref(self.split), self.module, b"sk_split"), "sk_split")
            _check(cu.cuModuleGetFunction(ctypes.byref(self.merge), self.module, b"sk_merge"), "sk_merge")
            _check(cu.cuFuncSetAttribute(self.split, 8, self.smem), "max dynamic shared memory")  # attribute 8
            n = ctypes.c_int()
            _check(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), self.split, nw * 32,
                                                                  ctypes.c_size_t(self.smem)), "occupancy")
            self.blocks_per_sm = max(1, n.value)
            regs = ctypes.c_int()
            cu.cuFuncGetAttribute(ctypes.byref(regs), 4, self.split)  # CU_FUNC_ATTRIBUTE_NUM_REGS
            self.regs = regs.value
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count

    def launch_split(self, params: Params, grid: tuple[int, int], stream: int) -> None:
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(params), ctypes.c_void_p))
        _check(_cuda().cuLaunchKernel(self.split, grid[0], grid[1], 1, self.nw * 32, 1, 1, self.smem,
                                      ctypes.c_void_p(stream), args, None), "sk_split launch")

    def launch_merge(self, vals: list, grid: int, stream: int) -> None:
        refs = [v if isinstance(v, ctypes._SimpleCData) else _P(v) for v in vals]
        args = (ctypes.c_void_p * len(refs))(*[ctypes.cast(ctypes.pointer(r), ctypes.c_void_p) for r in refs])
        _check(_cuda().cuLaunchKernel(self.merge, grid, 1, 1, self.D, 1, 1, 0, ctypes.c_void_p(stream), args, None),
               "sk_merge launch")


_LOCK = threading.Lock()
_KERNELS: dict = {}
_BROKEN: dict = {}


def kernels(device: int, D: int, kkind: int, kb: int, vb: int, sg: int = GS, ladder: int = 3) -> Kernels:
    """The loaded kernels of one configuration (sg: channels of a per-token scale group), in the launch shape of
    `tuning.current().cuda` (compiled at the first call)."""
    cfg = tuning.current().cuda
    kw = dict(nw=cfg.warps, stages=cfg.stages, minb=cfg.min_blocks, ladder=ladder, sg=sg)
    key = (device, D, kkind, kb, vb, tuple(kw.items()))
    with _LOCK:
        if key in _BROKEN:
            raise RuntimeError(_BROKEN[key])
        if key not in _KERNELS:
            try:
                _KERNELS[key] = Kernels(device, D, kkind, kb, vb, **kw)
            except (RuntimeError, OSError) as exc:
                _BROKEN[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
                raise
        return _KERNELS[key]


# ---------------------------------------------------------------- what the path takes
def _kinds(seg: KVSegment) -> tuple[int, int, int, int] | str:
    """(key kind, key bits, value bits, channels of a per-token scale group) of a segment, or why it is not for
    this path."""
    k, v = seg.keys, seg.values
    if not isinstance(k, QTensor) and not isinstance(v, QTensor):
        return (0, 0, 0, GS) if seg.num_tokens <= MAX_TAIL else "a long full-precision segment"
    if not (isinstance(k, QTensor) and isinstance(v, QTensor)):
        return "keys and values of one segment quantized and full precision"
    D = v.codes.shape[-1] * 8 // v.bits
    if k.axis == -2:   # KIVI's per-channel keys: groups of GS tokens, 2 or 4 bits; the values per token
        if k.group_size != GS or k.bits not in (2, 4):
            return f"per-channel keys of {k.bits} bits in groups of {k.group_size} (the kernel reads 2 or 4, {GS})"
        why = per_token_problem(D, None, v.bits, v.group_size)
    else:
        why = (f"group size {k.group_size}/{v.group_size} (keys and values share one)" if k.group_size != v.group_size
               else per_token_problem(D, k.bits, v.bits, v.group_size))
    return why or (1 if k.axis == -1 else 2, k.bits, v.bits, v.group_size)


def per_token_problem(D: int, kb: int | None, vb: int, sg: int) -> str | None:
    """Why per-token keys of `kb` bits (None: the keys are per-channel, judged apart) and values of `vb` bits in
    scale groups of `sg` channels at head_dim D are not for this path; None when they are."""
    if not (sg == GS or sg == 2 * GS and D == 128):
        return f"group size {sg} (the kernel reads per-token groups of {GS} channels, or of {2 * GS} at head_dim 128)"
    ok = (2, 3, 4, 8) if D == 128 else (2, 4, 8)   # 3-bit rows: 48 bytes at head_dim 128 only
    if (kb is not None and kb not in ok) or vb not in ok:
        return f"{kb}-bit keys / {vb}-bit values at head_dim {D} (the kernel reads {'/'.join(map(str, ok))})"
    return None


def _aligned(t: torch.Tensor, row_bytes_multiple: int, base: int) -> bool:
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % base == 0
            and all(s * es % row_bytes_multiple == 0 for s in t.stride()[:3]))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unsupported(q: torch.Tensor, segments: Sequence[KVSegment]) -> str | None:
    """None when the fast path takes this call, else the reason it does not."""
    if os.environ.get("SMARTKV_FAST_ATTN", "1") == "0":
        return "SMARTKV_FAST_ATTN=0"
    if not q.is_cuda or _capability(q.device) < (8, 0):
        return "needs a CUDA device of compute capability 8.0 or newer"
    D, Hq = q.shape[-1], q.shape[1]
    if D not in (64, 128) or q.dtype not in (torch.float16, torch.bfloat16):
        return f"head_dim {D}, {q.dtype} query (the kernel takes head_dim 64 or 128, fp16 or bf16)"
    least = tuning.current().cuda.min_tokens
    if q.shape[0] * sum(s.num_tokens for s in segments) < least:
        return f"fewer than {least} cached tokens (batch x tokens): the Triton kernels are as fast there"
    kinds = [_kinds(s) for s in segments]
    for why in kinds:
        if isinstance(why, str):
            return why
    if not any(k[0] for k in kinds):
        return "no quantized segment"
    for seg in segments:
        Hkv = seg.keys.shape[1]
        if Hq // Hkv > HMAX:
            return f"{Hq // Hkv} query heads per KV head (at most {HMAX})"
        for part in (seg.key_residual, seg.value_residual, seg.key_scale, seg.key_shift):
            if part is not None and (part.dtype not in (torch.float16, torch.bfloat16) or part.stride(-1) != 1):
                return "full-precision parts must be fp16 or bf16 with contiguous channels"
        if not isinstance(seg.keys, QTensor):
            for part in (seg.keys, seg.values):
                if part.dtype not in (torch.float16, torch.bfloat16) or part.stride(-1) != 1:
                    return "full-precision parts must be fp16 or bf16 with contiguous channels"
            continue
        if seg.num_tokens - min(seg.quantized_keys, seg.quantized_values) > MAX_TAIL and not seg.residual_last:
            return f"more than {MAX_TAIL} full-precision tokens after the quantized part"
        for qt in (seg.keys, seg.values):
            row = 2 * (D // qt.group_size) if qt.axis == -1 else 16   # bytes of a token's scales / a scale row
            if not (_aligned(qt.codes, 16, 16) and _aligned(qt.scale, row, row)
                    and qt.zero.stride() == qt.scale.stride() and _aligned(qt.zero, 1, row)):
                return "codes or scales not aligned for 16-byte copies"
    return None


def note_fallback(why: str) -> None:
    PATHS[why] += 1
    if PATHS[why] == 1:
        (log.warning if why.startswith(("NVRTC", "libnvrtc", "RuntimeError")) else log.info)(
            "decode attention: Triton kernels instead of the CUDA fast path: %s", why)


# ---------------------------------------------------------------- planning and launching
def plan_blocks(stages: int, programs: int, slots: int, nw: int = 4) -> tuple[int, int]:
    """(main blocks per sequence and KV head, stages per warp) for `stages` 32-token stages per sequence and
    head, when `slots` blocks run at once: the fewest waves' worth of time, ceil(programs x blocks / slots) x
    (stages per warp + STAGE_OVERHEAD); ties go to fewer blocks."""
    best = (0.0, 0, 0)
    for n in range(1, -(-stages // nw) + 1):
        per_warp = -(-stages // (n * nw))
        used = -(-stages // (per_warp * nw))
        cost = -(-programs * used // slots) * (per_warp + STAGE_OVERHEAD)
        if not best[1] or cost < best[0] - 1e-9:
            best = (cost, used, per_warp)
    return best[1], best[2]


def _strides(p: Params, prefix: str, t: torch.Tensor, suffixes: str = "bht") -> None:
    for s, st in zip(suffixes, t.stride(), strict=False):
        setattr(p, f"s{prefix}{s}", st)


def _params(q3: torch.Tensor, seg: KVSegment, lens, seg_offset: int, qk_scale: float) -> tuple[Params, int, int]:
    """Params of one segment but its split plan and partial buffers; its quantized-token and tail bounds."""
    p, k, v = Params(), seg.keys, seg.values
    p.q, (p.sqb, p.sqh) = q3.data_ptr(), q3.stride()[:2]
    flags = F_QBF16 if q3.dtype == torch.bfloat16 else 0
    dummy = q3.data_ptr()
    if isinstance(k, QTensor):
        p.kq, p.ks, p.kz, p.vq, p.vs, p.vz = (t.data_ptr() for t in (k.codes, k.scale, k.zero, v.codes, v.scale,
                                                                     v.zero))
        _strides(p, "kq", k.codes), _strides(p, "ks", k.scale), _strides(p, "vq", v.codes), _strides(p, "vs", v.scale)
        kr, vr, tk, tv = seg.key_residual, seg.value_residual, seg.quantized_keys, seg.quantized_values
    else:  # a full-precision segment: every token goes through the tail warps
        p.kq = p.ks = p.kz = p.vq = p.vs = p.vz = dummy
        kr, vr, tk, tv = k, v, 0, 0
    p.kr = kr.data_ptr() if kr is not None else dummy
    p.vr = vr.data_ptr() if vr is not None else dummy
    if kr is not None:
        _strides(p, "kr", kr)
        flags |= F_KRBF16 if kr.dtype == torch.bfloat16 else 0
    if vr is not None:
        _strides(p, "vr", vr)
        flags |= F_VRBF16 if vr.dtype == torch.bfloat16 else 0
    p.ka = p.kb = p.len = dummy
    if seg.key_scale is not None:
        p.ka, p.kb = seg.key_scale.data_ptr(), seg.key_shift.data_ptr()
        _strides(p, "ka", seg.key_scale, "bh")
        flags |= F_KAFF | (F_KABF16 if seg.key_scale.dtype == torch.bfloat16 else 0)
    if lens is not None:
        p.len = lens.data_ptr()
        flags |= F_LEN | (F_LEN64 if lens.dtype == torch.int64 else 0)
    flags |= F_RESLAST if seg.residual_last else 0
    p.qk_scale, p.seg_offset, p.t_seg, p.tk, p.tv, p.flags = qk_scale, seg_offset, seg.num_tokens, tk, tv, flags
    if seg.residual_last:
        return p, tk, 1
    return p, min(tk, tv), seg.num_tokens - min(tk, tv)


_COUNTERS: dict = {}  # (device, stream) -> int32 zeros, one per (sequence, KV head): the fused merge's arrivals


def _counters(dev: int, stream: int, n: int) -> torch.Tensor | None:
    """Zeroed arrival counters (the merging block sets its own back to 0); None while a graph is being captured
    and there are too few (then the separate merge kernel runs)."""
    have = _COUNTERS.get((dev, stream))
    if have is None or have.numel() < n:
        if torch.cuda.is_current_stream_capturing():
            return None
        have = _COUNTERS[(dev, stream)] = torch.zeros(max(n, 1024), dtype=torch.int32, device=f"cuda:{dev}")
    return have


_SIDE: dict = {}


def _side_streams(dev: int, n: int) -> list:
    """n streams of the device besides the current one (made once, before any capture needs them)."""
    have = _SIDE.setdefault(dev, [])
    while len(have) < max(n, 8):
        have.append(torch.cuda.Stream(dev))
    return have[:n]


def _plan(q3, segments, kinds, lengths, scaling, dev, ladder, concurrent: bool = False) -> tuple[list, int]:
    """One (kernels, Params, blocks, KV heads, lengths, segment index) per non-empty segment, the partials' split
    offsets filled in. Each launch is planned to fill the card alone, or (`concurrent`: the launches run side by
    side) a share of it in proportion to its tokens among the quantized segments', so that together they fill it
    once."""
    B, Hq, D = q3.shape
    cfg = next(k for k in kinds if k[0])
    total = sum(s.num_tokens for s, k in zip(segments, kinds) if k[0]) if concurrent else 0
    launches, S, offset = [], 0, 0
    for i, (seg, kind) in enumerate(zip(segments, kinds, strict=True)):
        if seg.num_tokens:
            kern = kernels(dev, D, *(kind if kind[0] else cfg), ladder=ladder)
            Hkv = seg.keys.shape[1]
            lens = seg.lengths if seg.lengths is not None else lengths
            if lens is not None and (lens.device != q3.device or lens.dtype not in (torch.int32, torch.int64)
                                     or not lens.is_contiguous()):
                lens = lens.to(device=q3.device, dtype=torch.int32).contiguous()
            p, quant, tail = _params(q3, seg, lens, 0 if seg.lengths is not None else offset, scaling * LOG2E)
            slots = kern.blocks_per_sm * kern.sms
            if total:
                slots = max(B * Hkv, round(slots * seg.num_tokens / total))
            n, per_warp = plan_blocks(-(-quant // TILE), B * Hkv, slots, kern.nw)
            if n:   # the tail tokens are shared out over the main warps
                p.chunk, p.tail_w = per_warp * TILE, -(-tail // (n * kern.nw))
            else:   # nothing quantized: blocks of tail warps alone, 32 tokens each
                n, p.chunk, p.tail_w = -(-tail // (kern.nw * TILE)), 0, TILE
            p.h_kv, p.ng, p.split0 = Hkv, Hq // Hkv, S
            launches.append((kern, p, n, Hkv, lens, i))
            S += n
        offset += seg.num_tokens
    return launches, S


def decode_attention_cuda(q: torch.Tensor, segments: Sequence[KVSegment], scaling: float,
                          lengths: torch.Tensor | None = None, ladder: int = 3,
                          scores: Sequence[torch.Tensor] | None = None, fold: Sequence | None = None,
                          lse_io: torch.Tensor | None = None):
    """`decode_attention` on the CUDA kernels; `unsupported` must have said None. Returns the output in q's shape;
    with `scores` (one (B, Hq, T_seg) fp32 buffer per segment, token stride 1, or None: not written), also writes each valid token's
    logit there (log2 domain, scaling included) and returns (output, lse (B, Hq) fp32, the log2-sum-exp of all
    logits), from which `split.token_probs` makes the token probabilities. `fold` and `lse_io`: as
    `kernels.decode_attention`'s (lse_io contiguous; the log2-sum-exp is written there, and returned with scores).
    ladder < 3: the benchmark ladder's partial kernels (bytes only, + unpacking, + q.k), wrong outputs."""
    squeeze = q.dim() == 3
    q3 = q if squeeze else q.squeeze(2)
    q3 = q3 if q3.stride(-1) == 1 else q3.contiguous()
    B, Hq, D = q3.shape
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    kinds = [_kinds(s) for s in segments]
    # several segments (SmartKV's classes) run side by side on streams of their own (branches of a captured graph),
    # each planned for a share of the card, so no launch's last wave waits alone; the separate merge kernel then
    # combines them (the last-block merge needs launch order). With or without scores: the same plan, the same output
    concurrent = sum(1 for s in segments if s.num_tokens) > 1
    launches, S = _plan(q3, segments, kinds, lengths, scaling, dev, ladder, concurrent)
    o_part = torch.empty(B, Hq, max(S, 1), D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, max(S, 1), dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = lse_io if lse_io is not None else torch.empty(B, Hq, dtype=torch.float32, device=q.device) \
        if scores is not None else None
    main = torch.cuda.current_stream(dev)
    stream = main.cuda_stream
    # the merge inside the split kernel writes no log-sum-exp: with scores or a fold, the separate merge kernel runs
    cnt = (_counters(dev, stream, B * launches[-1][3]) if launches and lse is None and not concurrent else None)
    side = _side_streams(dev, len(launches) - 1) if concurrent else []
    if side:   # one event of the inputs' readiness, waited on by every side stream
        ready = main.record_event()
        for s in side:
            s.wait_event(ready)
    for j, (kern, p, n, Hkv, _, i) in enumerate(launches):
        p.op, p.lp, p.out = o_part.data_ptr(), lse_part.data_ptr(), out.data_ptr()
        p.sob, p.soh, p.sos = o_part.stride()[:3]
        p.slb, p.slh = lse_part.stride()[:2]
        p.sxb, p.sxh = out.stride()[:2]
        p.s_total = S
        p.sc = o_part.data_ptr()
        if scores is not None and scores[i] is not None:
            sc = scores[i]
            if sc.shape != (B, Hq, segments[i].num_tokens) or sc.dtype != torch.float32 or sc.stride(-1) != 1:
                raise ValueError(f"scores[{i}] must be ({B}, {Hq}, {segments[i].num_tokens}) fp32 with token "
                                 f"stride 1, got {tuple(sc.shape)} {sc.dtype} strides {sc.stride()}")
            p.sc, (p.sscb, p.ssch), p.flags = sc.data_ptr(), sc.stride()[:2], p.flags | F_SCORES
        p.fc = p.fseen = p.flp = o_part.data_ptr()
        if fold is not None and fold[i] is not None:   # read by the splits, written by the merge after them
            codes, seen = fold[i]
            p.fc, (p.fcb, p.fch), p.fseen, p.flp = codes.data_ptr(), codes.stride()[:2], seen.data_ptr(), \
                lse_io.data_ptr()
            p.flags = p.flags | F_FOLD
        if cnt is not None and j == len(launches) - 1:  # its last block per sequence and head merges
            p.cnt, p.flags = cnt.data_ptr(), p.flags | F_MERGE
        else:
            p.cnt = o_part.data_ptr()
        kern.launch_split(p, (n, B * Hkv), side[j - 1].cuda_stream if j and side else stream)
    for s in side:
        main.wait_stream(s)
    if cnt is None:
        if S == 0:
            lse_part.fill_(float("-inf"))
        merge = launches[0][0] if launches else kernels(dev, D, *next(k for k in kinds if k[0]))
        merge.launch_merge([o_part.data_ptr(), lse_part.data_ptr(), out.data_ptr(),
                            lse.data_ptr() if lse is not None else None, _I(max(S, 1)),
                            *[_I64(s) for s in (*o_part.stride()[:3], *lse_part.stride()[:2], *out.stride()[:2])],
                            _I(Hq), _I(int(q.dtype == torch.bfloat16))], B * Hq, stream)
    PATHS["fast"] += 1
    out = out if squeeze else out.unsqueeze(2)
    return out if scores is None and fold is None else (out, lse)
