// Split-KV decode attention over packed KV codes, CUDA C++ (sm_80+), compiled at first use through NVRTC
// (smartkv/kernels/cuda_attn.py). One configuration per compile, set by the SK_* macros below.
//
// A block holds NW independent warps working on one (sequence, KV head). Each warp streams its run of the
// quantized tokens through a per-warp cp.async ring of 32-token stages (packed codes and fp16 scales staged in
// shared memory, rows padded so the fragment reads hit distinct banks) and runs both dots on the tensor cores
// (mma.m16n8k16, fp32 accumulation):
//   scores^T = K . Q^T   A = 16 tokens x 16 channels of codes, B = the group's queries (N = 8 columns: up to
//                        8 query heads). Per-token keys keep one accumulator per channel group and apply
//                        scale and zero after the dot; per-channel keys (KIVI) fold the scale into the query
//                        once per 32-token group and add q . zero.
//   out^T   += V^T . P'^T  A = 16 channels x 16 tokens of codes, B = p * value scale (per group), a second dot
//                        of the zeros against p.
// Codes become fp16 operands by masking bits where they sit: a code c read as the fp16 bit pattern c * 2^s is
// the subnormal c * 2^(s-24), so one LOP3 yields a register of two codes and the per-position factor 2^s is
// undone on the query (keys) or the accumulator row (values). Pairs of tokens for the value operand come from
// one PRMT. No unpacked tile touches shared memory.
// The tokens after the quantized part (full-precision windows, the new token) are shared out over the warps,
// a few each, in plain fp32 per token (blocks of such warps alone when nothing is quantized). Every block
// combines its warps and writes one partial (output, log2-sum-exp); the last block of each (sequence, KV head)
// to finish merges every partial of the call (Flash-Decoding), or sk_merge does when there are no counters.

#ifndef SK_D
#define SK_D 128
#endif
#ifndef SK_KKIND
#define SK_KKIND 1          // 1: per-token key groups of 32 channels; 2: per-channel key groups of 32 tokens
#endif
#ifndef SK_KB
#define SK_KB 4
#endif
#ifndef SK_VB
#define SK_VB 4
#endif
#ifndef SK_SG
#define SK_SG 32            // channels sharing one per-token scale and zero: 32, or 64 (head_dim 128 only)
#endif
#ifndef SK_NW
#define SK_NW 4
#endif
#ifndef SK_STAGES
#define SK_STAGES 3
#endif
#ifndef SK_MINB
#define SK_MINB 1           // blocks per SM the register allocation must allow
#endif
#ifndef SK_LADDER
#define SK_LADDER 3         // 0: stream the bytes, 1: + unpack, 2: + q.k, 3: full attention
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define DEVI __device__ __forceinline__
#define SK_INF __int_as_float(0x7f800000)

constexpr int D = SK_D, KKIND = SK_KKIND, KB = SK_KB, VB = SK_VB, NW = SK_NW, STAGES = SK_STAGES;
constexpr int LADDER = SK_LADDER;
constexpr int GS = 32;                     // group size: channels (per-token) or tokens (per-channel)
constexpr int NGRP = D / GS;               // 32-channel groups of a row: the unit of the dots below
constexpr int SG = SK_SG, NSG = D / SG;    // per-token scale groups (one or two 32-channel groups each)
DEVI int sgi(int grp) { return grp / (SG / GS); }   // the scale group of 32-channel group grp
static_assert(SG == GS || (SG == 2 * GS && D == 128), "per-token scale groups of 32 channels, or 64 at head_dim 128");
static_assert((KB != 3 && VB != 3) || (D == 128 && KKIND == 1), "3-bit codes: per-token, head_dim 128");
constexpr int TILE = 32;                   // tokens per stage
constexpr int HMAX = 8;                    // query heads per KV head, at most (the dot's N)
constexpr int NMT = D / 16;                // m-tiles of the value dot = k-steps of the key dot

enum { F_LEN = 1, F_LEN64 = 2, F_RESLAST = 4, F_KAFF = 8, F_QBF16 = 16, F_KRBF16 = 32, F_VRBF16 = 64,
       F_KABF16 = 128, F_MERGE = 256, F_SCORES = 512, F_FOLD = 1024 };

struct Params {
  const u16* q; i64 sqb, sqh;
  const u8* kq; i64 skqb, skqh, skqt;
  const u16* ks; const u16* kz; i64 sksb, sksh, skst;
  const u16* kr; i64 skrb, skrh, skrt;
  const u8* vq; i64 svqb, svqh, svqt;
  const u16* vs; const u16* vz; i64 svsb, svsh, svst;
  const u16* vr; i64 svrb, svrh, svrt;
  const u16* ka; const u16* kb; i64 skab, skah;
  const void* len;
  float* op; float* lp; i64 sob, soh, sos, slb, slh;
  u16* out; int* cnt; i64 sxb, sxh;        // F_MERGE: the last block of each (sequence, KV head) merges
  float* sc; i64 sscb, ssch;               // F_SCORES: each token's logit (log2 domain), [b][query head][token]
  u8* fc; i64 fcb, fch;                    // F_FOLD: each token's importance code, [b][KV head][token], folded here
  const float* fseen; const float* flp;    // F_FOLD: the codes' count of queries (1,); the previous lse (B, Hq)
  float qk_scale;                          // softmax scale * log2(e)
  int seg_offset, t_seg, tk, tv, h_kv, ng, chunk, tail_w, split0, s_total, flags;
};

// ---------------------------------------------------------------- small helpers
DEVI u32 prmt(u32 a, u32 b, u32 s) { u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s)); return d; }
DEVI u32 pack_h2(float lo, float hi) { u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d; }
DEVI float h2f_lo(u32 x) { float f; asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(x)); return f; }
DEVI float h2f_hi(u32 x) { float f; asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(x)); return f; }
DEVI float half_at(u32 x, int hi) { return hi ? h2f_hi(x) : h2f_lo(x); }
DEVI float f16(u16 x) { float f; asm("{.reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "h"(x)); return f; }
DEVI float bf16(u16 x) { return __uint_as_float(((u32)x) << 16); }
DEVI float ld16(const u16* p, bool bf) { u16 x = *p; return bf ? bf16(x) : f16(x); }
DEVI u32 hmul2(u32 a, u32 b) { u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
DEVI u32 hmax2(u32 a, u32 b) { u32 d; asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
DEVI float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
DEVI float pow2i(int e) { return __int_as_float((127 + e) << 23); }   // exact, -126 <= e <= 127
DEVI u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
DEVI void cp16(u32 dst, const void* src) { asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src)); }
DEVI void cp8(u32 dst, const void* src) { asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(dst), "l"(src)); }
DEVI void cp4(u32 dst, const void* src) { asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(dst), "l"(src)); }
DEVI void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> DEVI void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }
DEVI void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
DEVI float warp_max(float x) {
  for (int o = 16; o; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
DEVI float warp_sum(float x) {
  for (int o = 16; o; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------- layouts
__host__ __device__ constexpr int pad_words(int w, int mod, int rem) { return w % mod == rem ? w : pad_words(w + 1, mod, rem); }
constexpr int KROW = D * KB / 8, VROW = D * VB / 8;               // bytes of one token's codes
// smem row strides (words), chosen so each fragment read of a warp hits distinct banks
constexpr int KPADW = KKIND == 2 ? KROW / 4 : (KB == 8 ? pad_words(KROW / 4, 16, 8) : pad_words(KROW / 4, 8, 4));
constexpr int VPADW = pad_words(VROW / 4, 8, 4);
constexpr int KPAD = KPADW * 4, VPAD = VPADW * 4;
constexpr int SROW = NSG * 2;                                     // bytes of one token's per-token scales
constexpr int KMETA = KKIND == 2 ? D * 2 : TILE * SROW;           // bytes of key scales (and of zeros) per stage
constexpr int VMETA = TILE * SROW;
constexpr int K_OFF = 0, V_OFF = K_OFF + TILE * KPAD, KS_OFF = V_OFF + TILE * VPAD, KZ_OFF = KS_OFF + KMETA;
constexpr int VS_OFF = KZ_OFF + KMETA, VZ_OFF = VS_OFF + VMETA;
constexpr int STAGE_BYTES = (VZ_OFF + VMETA + 15) / 16 * 16;
constexpr int DUMP = HMAX * D + 2 * HMAX;   // floats of one warp state: O[h][c], m[h], l[h]
constexpr int WARP_BYTES = STAGES * STAGE_BYTES > 2 * DUMP * 4 ? STAGES * STAGE_BYTES : 2 * DUMP * 4;
constexpr int QZ_FLOATS = KKIND == 2 ? 8 * D : 0;   // per-channel keys: the query in the bias loop's order
constexpr int Q_BYTES = ((HMAX * D + HMAX * NGRP + 2 * HMAX + NW + QZ_FLOATS) * 4 + 15) / 16 * 16;
// dynamic shared memory of one block (cuda_attn.py computes the same; a launch with less traps)
constexpr int SMEM_BYTES = Q_BYTES + NW * WARP_BYTES;

// Per-token key codes, channel group grp of one row: 4 registers j, each two codes of one token.
// Register j feeds k-step 2*grp + (j >> 1), half (j & 1) of the lane's column pairs: columns 2t + 8(j&1) and
// + 1 hold channels 32grp + 8t + kchan(j, 0 / 1), read as code * kfac(j) * 2^-24.
DEVI int kchan(int j, int e) { return KB == 8 ? 2 * j + e : j + 4 * e; }
DEVI float kfac(int j) {
  return KB == 4 ? ((j & 1) ? 16.f : 1.f) : KB == 3 ? ((j & 1) ? 8.f : 1.f) : (KB == 2 ? (float)(1 << (2 * j)) : 1.f);
}
// 3-bit codes: 8 a 24-bit little-endian word (code e at bit 3e), read bytewise (words are 3-byte aligned)
DEVI u32 load24(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16); }
// four 3-bit codes of x (bits 0-11) beside four of y, as two codes a register: r[j] = (code j of x | code j of y
// << 16) at bit 3 (j & 1), so each stays inside the fp16 mantissa (bits 0-5; a code at bit 9 would not)
DEVI void pairs3(u32 x, u32 y, u32 (&r)[4]) {
  u32 w = (x & 0xFFFu) | ((y & 0xFFFu) << 16), w6 = w >> 6;
  r[0] = w & 0x00070007u; r[1] = w & 0x00380038u; r[2] = w6 & 0x00070007u; r[3] = w6 & 0x00380038u;
}
DEVI void unpack_k(const u8* row, int grp, int t, u32 (&r)[4]) {
  if (KB == 3) {                        // channels 32grp + 8t + 0..7: one 24-bit word; codes 0-3 and 4-7 paired
    u32 w = load24(row + 12 * grp + 3 * t);
    pairs3(w, w >> 12, r);
  } else if (KB == 4) {
    u32 w = *(const u32*)(row + 16 * grp + 4 * t);
    r[0] = w & 0x000F000Fu; r[1] = w & 0x00F000F0u;
    w >>= 8;
    r[2] = w & 0x000F000Fu; r[3] = w & 0x00F000F0u;
  } else if (KB == 8) {
    uint2 w = *(const uint2*)(row + 32 * grp + 8 * t);
    r[0] = prmt(w.x, 0, 0x4140); r[1] = prmt(w.x, 0, 0x4342);
    r[2] = prmt(w.y, 0, 0x4140); r[3] = prmt(w.y, 0, 0x4342);
  } else {
    u32 x = prmt((u32)*(const u16*)(row + 8 * grp + 2 * t), 0, 0x4140);
    r[0] = x & 0x00030003u; r[1] = x & 0x000C000Cu; r[2] = x & 0x00300030u; r[3] = x & 0x00C000C0u;
  }
}

// Per-channel key codes (KIVI) of one row: the lane's D/4 channels starting at (D/4) t, D/8 registers ri, each
// two codes; register ri feeds k-step ri >> 1, half ri & 1.
constexpr int CREG = D / 8;
DEVI int cchan(int ri, int e) {               // channel inside the lane's run
  if (KB == 2) { int u = ri / 8, j = ri % 8; return 16 * u + j + 8 * e; }
  int u = ri / 4, j = ri % 4; return 8 * u + j + 4 * e;
}
DEVI float cfac(int ri) { return KB == 2 ? (float)(1 << (2 * ((ri % 8) & 3))) : (((ri % 4) & 1) ? 16.f : 1.f); }
DEVI void unpack_kc(const u8* row, int t, u32 (&r)[CREG]) {
  constexpr int WORDS = D * KB / 128;         // words per lane run
  const u32* p = (const u32*)(row + t * WORDS * 4);
#pragma unroll
  for (int u = 0; u < WORDS; ++u) {
    u32 w = p[u];
    if (KB == 2) {
      u32 w8 = w >> 8;
#pragma unroll
      for (int j = 0; j < 4; ++j) { r[8 * u + j] = w & (0x00030003u << (2 * j)); r[8 * u + 4 + j] = w8 & (0x00030003u << (2 * j)); }
    } else {
      u32 w8 = w >> 8;
      r[4 * u + 0] = w & 0x000F000Fu; r[4 * u + 1] = w & 0x00F000F0u;
      r[4 * u + 2] = w8 & 0x000F000Fu; r[4 * u + 3] = w8 & 0x00F000F0u;
    }
  }
}

// Value codes of channel group grp for two tokens (rows a, b): 4 registers n, each (code of a, code of b) of
// channel 32grp + 4g + n, read as code * vfac(n) * 2^-24. Register n is row g + 8(n & 1) of m-tile
// 2grp + (n >> 1).
DEVI float vfac(int n) {
  return VB == 4 ? ((n & 1) ? 16.f : 1.f) : VB == 3 ? ((n & 1) ? 8.f : 1.f) : (VB == 2 ? (float)(1 << (2 * n)) : 1.f);
}
DEVI void unpack_v(const u8* ra, const u8* rb, int grp, int g, u32 (&r)[4]) {
  if (VB == 3) {                        // channels 32grp + 4g + 0..3: 12 bits from bit 96grp + 12g of each row
    const int off = 12 * grp + (3 * g) / 2, sh = 4 * (g & 1);
    pairs3(((u32)ra[off] | ((u32)ra[off + 1] << 8)) >> sh, ((u32)rb[off] | ((u32)rb[off + 1] << 8)) >> sh, r);
  } else if (VB == 4) {
    int off = 16 * grp + 4 * (g >> 1);
    u32 x = prmt(*(const u32*)(ra + off), *(const u32*)(rb + off), (g & 1) ? 0x7632 : 0x5410);
    r[0] = x & 0x000F000Fu; r[1] = x & 0x00F000F0u;
    x >>= 8;
    r[2] = x & 0x000F000Fu; r[3] = x & 0x00F000F0u;
  } else if (VB == 8) {
    int off = 32 * grp + 4 * g;
    u32 wa = *(const u32*)(ra + off), wb = *(const u32*)(rb + off);
    u32 lo = prmt(wa, wb, 0x5140), hi = prmt(wa, wb, 0x7362);
    r[0] = prmt(lo, 0, 0x4140); r[1] = prmt(lo, 0, 0x4342); r[2] = prmt(hi, 0, 0x4140); r[3] = prmt(hi, 0, 0x4342);
  } else {
    int off = 8 * grp + g;
    u32 x = prmt((u32)ra[off], (u32)rb[off], 0x5410);
    r[0] = x & 0x00030003u; r[1] = x & 0x000C000Cu; r[2] = x & 0x00300030u; r[3] = x & 0x00C000C0u;
  }
}

// ---------------------------------------------------------------- the main (tensor-core) warp
struct Shared {           // block-wide values computed in the prologue
  const float* qe;        // [HMAX][D] effective query (times key_scale), fp32
  const float2* qz;       // per-channel keys: qe[g][(D/4) t + 2i + {0, 1}] at [(4i + t) * 8 + g], conflict-free
  const float* qsum;      // [HMAX][NGRP] sum of qe over each channel group
  const float* qaff;      // [HMAX] q . key_shift
  float qnorm;            // power of two with |qe| * qnorm <= 1
};

DEVI void issue_stage(const Params& p, u8* st, i64 b, i64 hk, int tok0, int last, int lane) {
  const u8* kq = p.kq + b * p.skqb + hk * p.skqh;
  const u8* vq = p.vq + b * p.svqb + hk * p.svqh;
  constexpr int KC = KROW / 16, VC = VROW / 16;
#pragma unroll
  for (int k = 0; k < (TILE * KC + 31) / 32; ++k) {
    int i = lane + 32 * k, r = i / KC, c = i % KC, tok = min(tok0 + r, last);
    if (i < TILE * KC) cp16(saddr(st + K_OFF + r * KPAD + c * 16), kq + (u32)(tok * (int)p.skqt + c * 16));
  }
#pragma unroll
  for (int k = 0; k < (TILE * VC + 31) / 32; ++k) {
    int i = lane + 32 * k, r = i / VC, c = i % VC, tok = min(tok0 + r, last);
    if (i < TILE * VC) cp16(saddr(st + V_OFF + r * VPAD + c * 16), vq + (u32)(tok * (int)p.svqt + c * 16));
  }
  {
    int tok = min(tok0 + lane, last);
    const u16* vs = p.vs + b * p.svsb + hk * p.svsh + (u32)(tok * (int)p.svst);
    const u16* vz = p.vz + b * p.svsb + hk * p.svsh + (u32)(tok * (int)p.svst);
    if (SROW == 8) { cp8(saddr(st + VS_OFF + lane * 8), vs); cp8(saddr(st + VZ_OFF + lane * 8), vz); }
    else { cp4(saddr(st + VS_OFF + lane * 4), vs); cp4(saddr(st + VZ_OFF + lane * 4), vz); }
    if (KKIND == 1) {
      const u16* ks = p.ks + b * p.sksb + hk * p.sksh + (u32)(tok * (int)p.skst);
      const u16* kz = p.kz + b * p.sksb + hk * p.sksh + (u32)(tok * (int)p.skst);
      if (SROW == 8) { cp8(saddr(st + KS_OFF + lane * 8), ks); cp8(saddr(st + KZ_OFF + lane * 8), kz); }
      else { cp4(saddr(st + KS_OFF + lane * 4), ks); cp4(saddr(st + KZ_OFF + lane * 4), kz); }
    } else {                                  // one scale row and one zero row: the stage is one token group
      constexpr int RC = D * 2 / 16;          // 16-byte chunks per row (16 at D = 128)
      i64 row = tok0 / GS;
      if (lane < 2 * RC) {
        const u16* src = (lane < RC ? p.ks : p.kz) + b * p.sksb + hk * p.sksh + row * p.skst;
        int c = lane % RC;
        cp16(saddr(st + (lane < RC ? KS_OFF : KZ_OFF) + c * 16), (const u8*)src + c * 16);
      }
    }
  }
}

DEVI void pipeline_start(const Params& p, i64 b, i64 hk, int t0, int t1, u8* wbase) {
  const int nst = t1 > t0 ? (t1 - t0 + TILE - 1) / TILE : 0, lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nst) issue_stage(p, wbase + s * STAGE_BYTES, b, hk, t0 + s * TILE, t1 - 1, lane);
    cp_commit();
  }
}

// F_FOLD: the mean importance code at cp (`encode_importance` of a mean over `seen` queries) after one more query
// that gave the token `mass` summed over its ng heads (kernels.importance_fold's arithmetic, round half to even)
DEVI void fold_code(u8* cp, float mass, int ng, float seen) {
  const float c = (float)*cp;
  float mean = c == 255.f ? 0.f : exp2f(-c * 0.125f);
  mean = (mean * seen + mass / (float)ng) / (seen + 1.f);
  const float y = -8.f * log2f(fmaxf(mean, 2.5390362e-10f));   // 2^-31.875: code 255
  *cp = (u8)fminf(rintf(fmaxf(y, 0.f)), 255.f);
}

DEVI float fold_lse(const Params& p, i64 b, i64 hk, int h) {   // the previous query's log2-sum-exp of head h
  if (!(p.flags & F_FOLD) || h >= p.ng) return 0.f;
  const float x = p.flp[(b * p.h_kv + hk) * p.ng + h];
  return x > -1e30f ? x : 0.f;
}

DEVI void main_warp(const Params& p, const Shared& sh, i64 b, i64 hk, int t0, int t1, u8* wbase, float* dump) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, ng = p.ng;
  const bool hg = g < ng;
  // ---- the query as B fragments, in the order the key registers come
  u32 bq[KKIND == 1 ? NGRP * 4 : CREG];
  float qs2[KKIND == 1 ? NGRP * 2 : 1];
  if (KKIND == 1) {
#pragma unroll
    for (int grp = 0; grp < NGRP; ++grp) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        int c = 32 * grp + 8 * t;
        float f = sh.qnorm / kfac(j);
        float v0 = hg ? sh.qe[g * D + c + kchan(j, 0)] * f : 0.f, v1 = hg ? sh.qe[g * D + c + kchan(j, 1)] * f : 0.f;
        bq[grp * 4 + j] = pack_h2(v0, v1);
      }
      qs2[grp * 2 + 0] = sh.qsum[(2 * t) * NGRP + grp] * sh.qnorm * 5.9604645e-8f;       // * 2^-24
      qs2[grp * 2 + 1] = sh.qsum[(2 * t + 1) * NGRP + grp] * sh.qnorm * 5.9604645e-8f;
    }
  } else {
#pragma unroll
    for (int ri = 0; ri < CREG; ++ri) {
      int c = (D / 4) * t;
      float f = sh.qnorm / cfac(ri);
      float v0 = hg ? sh.qe[g * D + c + cchan(ri, 0)] * f : 0.f, v1 = hg ? sh.qe[g * D + c + cchan(ri, 1)] * f : 0.f;
      bq[ri] = pack_h2(v0, v1);
    }
  }
  const float qaff0 = sh.qaff[2 * t] * p.qk_scale, qaff1 = sh.qaff[2 * t + 1] * p.qk_scale;
  const float c1 = p.qk_scale * 16777216.f / sh.qnorm;           // acc -> logit (log2 domain)
  const float lp0 = fold_lse(p, b, hk, 2 * t), lp1 = fold_lse(p, b, hk, 2 * t + 1);
  const float fseen = (p.flags & F_FOLD) ? *p.fseen : 0.f;

  float o[NMT][4], z[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < NMT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -1e30f, m1 = -1e30f, l0 = 0.f, l1 = 0.f;
  int kvx = 0;
  u32 dummy = 0;

  const int nst = t1 > t0 ? (t1 - t0 + TILE - 1) / TILE : 0;
  const int last = t1 - 1;
  for (int s = 0; s < nst; ++s) {
    cp_wait<STAGES - 2>();
    __syncwarp();
    {
      int sn = s + STAGES - 1;
      if (sn < nst) issue_stage(p, wbase + (sn % STAGES) * STAGE_BYTES, b, hk, t0 + sn * TILE, last, lane);
      cp_commit();
    }
    const u8* st = wbase + (s % STAGES) * STAGE_BYTES;
    const int tok0 = t0 + s * TILE;
    if (LADDER == 0) { dummy ^= *(const u32*)(st + 4 * lane); continue; }

    // ---- scores of the 32 tokens: L[sub][i], rows 16sub + g (i < 2) and + 8 (i >= 2), heads 2t + (i & 1)
    float L[2][4];
    u32 bs[KKIND == 2 ? CREG : 1];
    float bias0 = 0.f, bias1 = 0.f, c1s = c1;
    if (KKIND == 2 && LADDER >= 2) {        // this stage's key group: q * scale in the query's order; q . zero
      const u32* srow = (const u32*)(st + KS_OFF + (D / 4) * t * 2);   // the lane's D/4 channels
      const u32* zrow = (const u32*)(st + KZ_OFF + (D / 4) * t * 2);
      u32 sreg[D / 8];
#pragma unroll
      for (int i = 0; i < D / 8; ++i) sreg[i] = srow[i];
      u32 mx = 0;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) mx = hmax2(mx, sreg[i]);
      u32 m16 = __reduce_max_sync(0xffffffffu, max(mx & 0xFFFFu, mx >> 16));
      int ks = min(29 - (int)((m16 >> 10) & 31), 15);
      u32 kpow = ((u32)(15 + ks) << 10) * 0x10001u;                    // 2^ks as fp16x2
#pragma unroll
      for (int ri = 0; ri < CREG; ++ri) {
        int ca = cchan(ri, 0), cb = cchan(ri, 1);
        u32 pair = prmt(sreg[ca >> 1], sreg[cb >> 1], ((ca & 1) ? 0x32 : 0x10) | ((cb & 1) ? 0x7600 : 0x5400));
        bs[ri] = hmul2(bq[ri], hmul2(pair, kpow));
      }
      c1s = c1 * pow2i(-ks);
      float zb = 0.f, zb2 = 0.f;               // q . zero over the lane's channels, head g
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        u32 zz = zrow[i];
        float2 qq = sh.qz[(4 * i + t) * 8 + g];
        zb += qq.x * h2f_lo(zz);
        zb2 += qq.y * h2f_hi(zz);
      }
      zb += zb2;
      zb += __shfl_xor_sync(0xffffffffu, zb, 1);
      zb += __shfl_xor_sync(0xffffffffu, zb, 2);
      bias0 = __shfl_sync(0xffffffffu, zb, 8 * t) * p.qk_scale;          // head 2t lives in lanes 4 * (2t) ..
      bias1 = __shfl_sync(0xffffffffu, zb, 8 * t + 4) * p.qk_scale;
    }
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      const u8* r0 = st + K_OFF + (16 * sub + g) * KPAD;
      const u8* r1 = r0 + 8 * KPAD;
      if (KKIND == 1) {
        float acc[NGRP][4];
#pragma unroll
        for (int grp = 0; grp < NGRP; ++grp) {
          u32 ra[4], rb[4];
          unpack_k(r0, grp, t, ra);
          unpack_k(r1, grp, t, rb);
          acc[grp][0] = acc[grp][1] = acc[grp][2] = acc[grp][3] = 0.f;
          if (LADDER == 1) { dummy ^= ra[0] ^ ra[1] ^ ra[2] ^ ra[3] ^ rb[0] ^ rb[1] ^ rb[2] ^ rb[3]; continue; }
          mma(acc[grp], ra[0], rb[0], ra[1], rb[1], bq[grp * 4 + 0], bq[grp * 4 + 1]);
          mma(acc[grp], ra[2], rb[2], ra[3], rb[3], bq[grp * 4 + 2], bq[grp * 4 + 3]);
        }
        const u32* sc0 = (const u32*)(st + KS_OFF + (16 * sub + g) * SROW);
        const u32* zr0 = (const u32*)(st + KZ_OFF + (16 * sub + g) * SROW);
        const u32* sc1 = (const u32*)(st + KS_OFF + (16 * sub + g + 8) * SROW);
        const u32* zr1 = (const u32*)(st + KZ_OFF + (16 * sub + g + 8) * SROW);
        if (LADDER == 1) { dummy ^= sc0[0] ^ zr0[0] ^ sc1[0] ^ zr1[0]; continue; }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const u32* sc = i < 2 ? sc0 : sc1;
          const u32* zr = i < 2 ? zr0 : zr1;
          float s = 0.f;
#pragma unroll
          for (int grp = 0; grp < NGRP; ++grp)
            s += half_at(sc[sgi(grp) >> 1], sgi(grp) & 1) * acc[grp][i]
               + half_at(zr[sgi(grp) >> 1], sgi(grp) & 1) * qs2[grp * 2 + (i & 1)];
          L[sub][i] = s * c1 + ((i & 1) ? qaff1 : qaff0);
        }
      } else {
        u32 ra[CREG], rb[CREG];
        unpack_kc(r0, t, ra);
        unpack_kc(r1, t, rb);
        if (LADDER == 1) {
#pragma unroll
          for (int i = 0; i < CREG; ++i) dummy ^= ra[i] ^ rb[i];
          continue;
        }
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int k = 0; k < NMT; ++k) mma(acc, ra[2 * k], rb[2 * k], ra[2 * k + 1], rb[2 * k + 1], bs[2 * k], bs[2 * k + 1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) L[sub][i] = acc[i] * c1s + ((i & 1) ? bias1 : bias0);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (tok0 + 16 * sub + g + (i < 2 ? 0 : 8) > last) L[sub][i] = -SK_INF;
    }
    if (p.flags & F_SCORES) {             // token probabilities: the caller normalises by the final log-sum-exp
#pragma unroll
      for (int sub = 0; sub < 2; ++sub)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int tok = tok0 + 16 * sub + g + (i < 2 ? 0 : 8), h = 2 * t + (i & 1);
          if (tok <= last && h < ng) p.sc[b * p.sscb + (hk * ng + h) * p.ssch + tok] = L[sub][i];
        }
    }
    if (p.flags & F_FOLD) {               // importance folded here, with the previous query's normaliser
      float mine = 0.f;                   // the mass of this lane's token: row 16 (t >> 1) + g + 8 (t & 1)
#pragma unroll
      for (int sub = 0; sub < 2; ++sub)
#pragma unroll
        for (int r = 0; r < 2; ++r) {     // token row 16 sub + g + 8 r: heads 2t, 2t + 1 here, the rest in lanes t^1..3
          float m = (2 * t < ng ? ex2(L[sub][2 * r] - lp0) : 0.f) + (2 * t + 1 < ng ? ex2(L[sub][2 * r + 1] - lp1) : 0.f);
          m += __shfl_xor_sync(0xffffffffu, m, 1);
          m += __shfl_xor_sync(0xffffffffu, m, 2);
          if (t == 2 * sub + r) mine = m;
        }
      // one fold a lane, every lane at once (a fold per row and quad lane serialised four folds a tile)
      const int tok = tok0 + 16 * (t >> 1) + g + 8 * (t & 1);
      if (tok <= last) fold_code(p.fc + b * p.fcb + hk * p.fch + tok, mine, ng, fseen);
    }

    if (LADDER < 3) {
      // the value codes, unpacked and dropped
#pragma unroll
      for (int sub = 0; sub < 2; ++sub)
#pragma unroll
        for (int grp = 0; grp < NGRP; ++grp) {
          u32 r0[4], r1[4];
          const u8* vb = st + V_OFF + 16 * sub * VPAD;
          unpack_v(vb + (2 * t) * VPAD, vb + (2 * t + 1) * VPAD, grp, g, r0);
          unpack_v(vb + (2 * t + 8) * VPAD, vb + (2 * t + 9) * VPAD, grp, g, r1);
          dummy ^= r0[0] ^ r0[1] ^ r0[2] ^ r0[3] ^ r1[0] ^ r1[1] ^ r1[2] ^ r1[3];
        }
      if (LADDER == 2)
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) dummy ^= __float_as_uint(L[sub][0] + L[sub][1] + L[sub][2] + L[sub][3]);
      continue;
    }

    // ---- online softmax over the stage (per head; heads 2t, 2t+1 in this lane)
    float mx0 = fmaxf(fmaxf(L[0][0], L[0][2]), fmaxf(L[1][0], L[1][2]));
    float mx1 = fmaxf(fmaxf(L[0][1], L[0][3]), fmaxf(L[1][1], L[1][3]));
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float al0 = ex2(m0 - mn0), al1 = ex2(m1 - mn1);
    m0 = mn0; m1 = mn1;
    float pr[2][4];
#pragma unroll
    for (int sub = 0; sub < 2; ++sub)
#pragma unroll
      for (int i = 0; i < 4; ++i) pr[sub][i] = ex2(L[sub][i] - ((i & 1) ? m1 : m0));
    l0 = l0 * al0 + (pr[0][0] + pr[0][2]) + (pr[1][0] + pr[1][2]);
    l1 = l1 * al1 + (pr[0][1] + pr[0][3]) + (pr[1][1] + pr[1][3]);

    // value normaliser: 2^kv with (largest value scale of the stage) * 2^kv < 2^15, so p * 2^kv * scale fits fp16;
    // lane i reads token i's scales
    u32 vmx = *(const u32*)(st + VS_OFF + lane * SROW);
    if (SROW == 8) vmx = hmax2(vmx, *(const u32*)(st + VS_OFF + lane * SROW + 4));
    u32 v16 = __reduce_max_sync(0xffffffffu, max(vmx & 0xFFFFu, vmx >> 16));
    // kv only moves when it must (this stage's scales would overflow) or could gain 2^4: the accumulator is
    // rescaled only when kv or some head's running max moved (a warp-uniform branch)
    const int kvs = min(29 - (int)((v16 >> 10) & 31), 15);
    const int kv = (s == 0 || kvs < kvx || kvs > kvx + 4) ? kvs : kvx;
    const float pf = pow2i(kv);
    const float r0f = al0 * pow2i(kv - kvx), r1f = al1 * pow2i(kv - kvx);
    kvx = kv;
    if (__any_sync(0xffffffffu, r0f != 1.f || r1f != 1.f)) {
#pragma unroll
      for (int i = 0; i < NMT; ++i) { o[i][0] *= r0f; o[i][1] *= r1f; o[i][2] *= r0f; o[i][3] *= r1f; }
      z[0] *= r0f; z[1] *= r1f; z[2] *= r0f; z[3] *= r1f;
    }

    // ---- p (times 2^kv) as the B operand: column = head g, rows = tokens 2t, 2t+1 (bp0) and 2t+8, 2t+9 (bp1)
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      u32 h01 = pack_h2(pr[sub][0] * pf, pr[sub][1] * pf), h23 = pack_h2(pr[sub][2] * pf, pr[sub][3] * pf);
      int src = 8 * t + (g >> 1);
      u32 x0 = __shfl_sync(0xffffffffu, h01, src), x1 = __shfl_sync(0xffffffffu, h01, src + 4);
      u32 y0 = __shfl_sync(0xffffffffu, h23, src), y1 = __shfl_sync(0xffffffffu, h23, src + 4);
      u32 sel = (g & 1) ? 0x7632 : 0x5410;
      u32 bp0 = prmt(x0, x1, sel), bp1 = prmt(y0, y1, sel);
      const u8* vb = st + V_OFF + 16 * sub * VPAD;
      // value scales and zeros of the lane's tokens 16sub + {2t, 2t+1, 2t+8, 2t+9}
      u32 sv[4][(NSG + 1) / 2], zv[4][(NSG + 1) / 2];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        int row = 16 * sub + 2 * t + (x & 1) + 8 * (x >> 1);
#pragma unroll
        for (int w = 0; w < (NSG + 1) / 2; ++w) {
          sv[x][w] = *(const u32*)(st + VS_OFF + row * SROW + 4 * w);
          zv[x][w] = *(const u32*)(st + VZ_OFF + row * SROW + 4 * w);
        }
      }
#pragma unroll
      for (int grp = 0; grp < NGRP; ++grp) {
        u32 r0[4], r1[4];
        unpack_v(vb + (2 * t) * VPAD, vb + (2 * t + 1) * VPAD, grp, g, r0);
        unpack_v(vb + (2 * t + 8) * VPAD, vb + (2 * t + 9) * VPAD, grp, g, r1);
        u32 ssel = (sgi(grp) & 1) ? 0x7632 : 0x5410;
        u32 s0 = prmt(sv[0][sgi(grp) >> 1], sv[1][sgi(grp) >> 1], ssel);
        u32 s1 = prmt(sv[2][sgi(grp) >> 1], sv[3][sgi(grp) >> 1], ssel);
        u32 pb0 = hmul2(bp0, s0), pb1 = hmul2(bp1, s1);
        mma(o[2 * grp + 0], r0[0], r0[1], r1[0], r1[1], pb0, pb1);
        mma(o[2 * grp + 1], r0[2], r0[3], r1[2], r1[3], pb0, pb1);
      }
      // zeros: rows = 32-channel groups (lanes g < NGRP), each its scale group's zero, columns = heads
      u32 za = zv[0][0], zb = zv[1][0], zc = zv[2][0], zd = zv[3][0];
#pragma unroll
      for (int w = 1; w < (NSG + 1) / 2; ++w)
        if ((sgi(g) >> 1) == w) { za = zv[0][w]; zb = zv[1][w]; zc = zv[2][w]; zd = zv[3][w]; }
      u32 zsel = (sgi(g) & 1) ? 0x7632 : 0x5410;
      u32 zp0 = g < NGRP ? prmt(za, zb, zsel) : 0u, zp1 = g < NGRP ? prmt(zc, zd, zsel) : 0u;
      mma(z, zp0, 0u, zp1, 0u, bp0, bp1);
    }
  }
  cp_wait<0>();
  __syncwarp();
  if (LADDER < 3 && dummy == 0x9E3779B9u) p.op[0] = 1.f;   // keeps the ladder's work alive

  // ---- this warp's state, in natural order: O[h][c] (relative to m[h]), m[h], l[h]
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float unit = pow2i(-kvx);
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt) {
    const int grp = mt >> 1, mm = mt & 1;
    float zg0 = __shfl_sync(0xffffffffu, z[0], 4 * grp + t), zg1 = __shfl_sync(0xffffffffu, z[1], 4 * grp + t);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int c = 32 * grp + 4 * g + 2 * mm + hh;
      const float f = 16777216.f / vfac(2 * mm + hh);
      if (2 * t < ng) dump[(2 * t) * D + c] = (o[mt][2 * hh] * f + zg0) * unit;
      if (2 * t + 1 < ng) dump[(2 * t + 1) * D + c] = (o[mt][2 * hh + 1] * f + zg1) * unit;
    }
  }
  if (g == 0) {
    if (2 * t < ng) { dump[HMAX * D + 2 * t] = m0; dump[HMAX * D + HMAX + 2 * t] = l0; }
    if (2 * t + 1 < ng) { dump[HMAX * D + 2 * t + 1] = m1; dump[HMAX * D + HMAX + 2 * t + 1] = l1; }
  }
}

// ---------------------------------------------------------------- tail warps: plain arithmetic per token
// Up to 32 tokens after the quantized part (windows, the new token), in fp32. Scores: one token a lane, keys
// read 8 channels at a time; values: D / 32 channels a lane, 4 tokens' loads in flight at a time.
DEVI void load8(float (&x)[8], u32 w0, u32 w1, u32 w2, u32 w3, bool bf) {   // 8 fp16 / bf16 from 4 words
  u32 w[4] = {w0, w1, w2, w3};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = bf ? __uint_as_float(w[i] << 16) : h2f_lo(w[i]);
    x[2 * i + 1] = bf ? __uint_as_float(w[i] & 0xFFFF0000u) : h2f_hi(w[i]);
  }
}

DEVI void key8(const Params& p, i64 b, i64 hk, int tok, int c8, int TK, float (&k)[8]) {
  if (tok >= TK) {
    uint4 w = *(const uint4*)(p.kr + b * p.skrb + hk * p.skrh + (i64)(tok - TK) * p.skrt + c8);
    load8(k, w.x, w.y, w.z, w.w, p.flags & F_KRBF16);
    return;
  }
  const u8* row = p.kq + b * p.skqb + hk * p.skqh + (i64)tok * p.skqt;
  u32 lo, hi = 0;                                   // the 8 codes, KB bits each, from bit 0 of lo (and hi)
  if (KB == 4) lo = *(const u32*)(row + c8 / 2);
  else if (KB == 3) lo = load24(row + c8 / 8 * 3);
  else if (KB == 2) lo = *(const u16*)(row + c8 / 4);
  else { uint2 v = *(const uint2*)(row + c8); lo = v.x; hi = v.y; }
  float sc[8], zr[8];
  if (KKIND == 1) {
    i64 mo = b * p.sksb + hk * p.sksh + (i64)tok * p.skst + c8 / SG;
    float a = f16(p.ks[mo]), z = f16(p.kz[mo]);
#pragma unroll
    for (int e = 0; e < 8; ++e) { sc[e] = a; zr[e] = z; }
  } else {
    i64 mo = b * p.sksb + hk * p.sksh + (i64)(tok / GS) * p.skst + c8;
    uint4 a = *(const uint4*)(p.ks + mo), z = *(const uint4*)(p.kz + mo);
    load8(sc, a.x, a.y, a.z, a.w, false);
    load8(zr, z.x, z.y, z.z, z.w, false);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    u32 code = KB == 8 ? ((e < 4 ? lo : hi) >> (8 * (e & 3))) & 0xFF : (lo >> (KB * e)) & ((1u << KB) - 1);
    k[e] = (float)code * sc[e] + zr[e];
  }
}

constexpr int TCH = D / 32;                         // value channels per lane in the tail
DEVI void value4(const Params& p, i64 b, i64 hk, int tok, int c0, int TV, float (&v)[TCH]) {
  if (tok >= TV) {
    const u16* r = p.vr + b * p.svrb + hk * p.svrh + (i64)(tok - TV) * p.svrt + c0;
    const bool bf = p.flags & F_VRBF16;
    if (TCH == 4) { uint2 w = *(const uint2*)r; v[0] = bf ? __uint_as_float(w.x << 16) : h2f_lo(w.x);
      v[1] = bf ? __uint_as_float(w.x & 0xFFFF0000u) : h2f_hi(w.x); v[TCH > 2 ? 2 : 0] = bf ? __uint_as_float(w.y << 16) : h2f_lo(w.y);
      v[TCH > 3 ? 3 : 1] = bf ? __uint_as_float(w.y & 0xFFFF0000u) : h2f_hi(w.y); }
    else { u32 w = *(const u32*)r; v[0] = bf ? __uint_as_float(w << 16) : h2f_lo(w); v[1] = bf ? __uint_as_float(w & 0xFFFF0000u) : h2f_hi(w); }
    return;
  }
  const u8* row = p.vq + b * p.svqb + hk * p.svqh + (i64)tok * p.svqt;
  u32 bits = VB == 8 ? (TCH == 4 ? *(const u32*)(row + c0) : *(const u16*)(row + c0))
           : VB == 3 ? ((u32)row[c0 * 3 / 8] | ((u32)row[c0 * 3 / 8 + 1] << 8)) >> ((c0 * 3) & 7)
           : VB == 4 ? (TCH == 4 ? *(const u16*)(row + c0 / 2) : *(const u8*)(row + c0 / 2))
                     : (u32)*(const u8*)(row + c0 / 4) >> (TCH == 4 ? 0 : 4 * ((c0 / 2) & 1));
  i64 mo = b * p.svsb + hk * p.svsh + (i64)tok * p.svst + c0 / SG;
  float a = f16(p.vs[mo]), z = f16(p.vz[mo]);
#pragma unroll
  for (int e = 0; e < TCH; ++e) v[e] = (float)((bits >> (VB * e)) & ((1u << VB) - 1)) * a + z;
}

DEVI void tail_warp(const Params& p, const Shared& sh, i64 b, i64 hk, int t0, int t1, int TK, int TV, float* dump) {
  const int lane = threadIdx.x & 31, ng = p.ng, c0 = TCH * lane;
  float mh[HMAX], lh[HMAX], o[HMAX][TCH];
#pragma unroll
  for (int h = 0; h < HMAX; ++h) {
    mh[h] = -1e30f; lh[h] = 0.f;
#pragma unroll
    for (int e = 0; e < TCH; ++e) o[h][e] = 0.f;
  }
  float lpf[HMAX];
#pragma unroll
  for (int h = 0; h < HMAX; ++h) lpf[h] = fold_lse(p, b, hk, h);
  const float fseen = (p.flags & F_FOLD) ? *p.fseen : 0.f;
  for (int tc = t0; tc < t1; tc += 32) {
    const int n = min(32, t1 - tc), tok = tc + min(lane, n - 1);
    float s[HMAX], fm = 0.f;
#pragma unroll
    for (int h = 0; h < HMAX; ++h) s[h] = 0.f;
#pragma unroll 4
    for (int c8 = 0; c8 < D; c8 += 8) {
      float k[8];
      key8(p, b, hk, tok, c8, TK, k);
#pragma unroll
      for (int h = 0; h < HMAX; ++h) {
        float4 qa = *(const float4*)(sh.qe + h * D + c8), qb = *(const float4*)(sh.qe + h * D + c8 + 4);
        s[h] += qa.x * k[0] + qa.y * k[1] + qa.z * k[2] + qa.w * k[3] + qb.x * k[4] + qb.y * k[5] + qb.z * k[6] + qb.w * k[7];
      }
    }
    float pr[HMAX];
#pragma unroll
    for (int h = 0; h < HMAX; ++h) {
      float lg = lane < n ? (s[h] + sh.qaff[h]) * p.qk_scale : -SK_INF;
      if ((p.flags & F_SCORES) && lane < n && h < ng) p.sc[b * p.sscb + (hk * ng + h) * p.ssch + tc + lane] = lg;
      if ((p.flags & F_FOLD) && lane < n && h < ng) fm += ex2(lg - lpf[h]);
      float mn = fmaxf(mh[h], warp_max(lg)), al = ex2(mh[h] - mn);
      pr[h] = ex2(lg - mn);
      lh[h] = lh[h] * al + warp_sum(pr[h]);
      mh[h] = mn;
#pragma unroll
      for (int e = 0; e < TCH; ++e) o[h][e] *= al;
    }
    if ((p.flags & F_FOLD) && lane < n) fold_code(p.fc + b * p.fcb + hk * p.fch + tc + lane, fm, ng, fseen);
    for (int j0 = 0; j0 < n; j0 += 4) {
      float v[4][TCH];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) value4(p, b, hk, tc + min(j0 + jj, n - 1), c0, TV, v[jj]);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int h = 0; h < HMAX; ++h) {
          float ph = __shfl_sync(0xffffffffu, pr[h], j0 + jj);   // 0 past the last token
#pragma unroll
          for (int e = 0; e < TCH; ++e) o[h][e] += ph * v[jj][e];
        }
    }
  }
#pragma unroll
  for (int h = 0; h < HMAX; ++h) {
    if (h < ng) {
#pragma unroll
      for (int e = 0; e < TCH; ++e) dump[h * D + c0 + e] = o[h][e];
    }
  }
  float mv = mh[0], lv = lh[0];
#pragma unroll
  for (int h = 1; h < HMAX; ++h) if (lane == h) { mv = mh[h]; lv = lh[h]; }
  if (lane < HMAX) { dump[HMAX * D + lane] = mv; dump[HMAX * D + HMAX + lane] = lv; }
}

// ---------------------------------------------------------------- the split kernel
extern "C" __global__ void __launch_bounds__(NW * 32, SK_MINB) sk_split(const Params p) {
  extern __shared__ __align__(16) u8 smem[];
  if (threadIdx.x == 0) {
    u32 dsm;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dsm));
    if (dsm < (u32)SMEM_BYTES) __trap();
  }
  float* qe = (float*)smem;                  // [HMAX][D]
  float* qsum = qe + HMAX * D;               // [HMAX][NGRP]
  float* qaff = qsum + HMAX * NGRP;          // [HMAX]
  float* qmx = qaff + HMAX;                  // [NW + HMAX]
  u8* wbase = smem + Q_BYTES + (threadIdx.x >> 5) * WARP_BYTES;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, ng = p.ng;
  const i64 b = blockIdx.y / p.h_kv, hk = blockIdx.y % p.h_kv;

  int seq = p.t_seg;
  if (p.flags & F_LEN) {
    i64 L = (p.flags & F_LEN64) ? ((const i64*)p.len)[b] : (i64)((const int*)p.len)[b];
    L -= p.seg_offset;
    seq = (int)(L < 0 ? 0 : (L > p.t_seg ? p.t_seg : L));
  }
  int TK = p.tk, TV = p.tv;
  if (p.flags & F_RESLAST) TK = TV = max(seq - 1, 0);
  const int TA = min(min(TK, TV), seq);
  // warp wi of this (sequence, KV head): main tokens [wi chunk, + chunk) of [0, TA), then tail tokens
  // [TA + wi tail_w, + tail_w) of [TA, seq) (blocks of tail warps alone when nothing is quantized: chunk 0)
  const int wi = (int)blockIdx.x * NW + warp;
  const int mt0 = wi * p.chunk, mt1 = min(mt0 + p.chunk, TA);
  const int tt0 = TA + wi * p.tail_w, tt1 = min(tt0 + p.tail_w, seq);
  pipeline_start(p, b, hk, mt0, mt1, wbase);   // the first bytes travel during the set-up below

  // ---- the group's queries (times key_scale when given), their group sums, q . key_shift, max |q|
  float qm = 0.f;
  for (int i = tid; i < HMAX * D; i += NW * 32) {
    int h = i / D, c = i % D;
    float v = 0.f;
    if (h < ng) {
      v = ld16(p.q + b * p.sqb + (hk * ng + h) * p.sqh + c, p.flags & F_QBF16);
      if (p.flags & F_KAFF) v *= ld16(p.ka + b * p.skab + hk * p.skah + c, p.flags & F_KABF16);
    }
    qe[i] = v;
    qm = fmaxf(qm, fabsf(v));
  }
  qm = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(qm)));
  if (lane == 0) qmx[warp] = qm;
  for (int h = warp; h < HMAX; h += NW) {
    float a = 0.f;
    if (h < ng && (p.flags & F_KAFF))
      for (int c = lane; c < D; c += 32)
        a += ld16(p.q + b * p.sqb + (hk * ng + h) * p.sqh + c, p.flags & F_QBF16) *
             ld16(p.kb + b * p.skab + hk * p.skah + c, p.flags & F_KABF16);
    a = warp_sum(a);
    if (lane == 0) qaff[h] = a;
  }
  __syncthreads();
  for (int i = tid; i < HMAX * NGRP; i += NW * 32) {
    float a = 0.f;
    for (int c = 0; c < GS; ++c) a += qe[(i / NGRP) * D + (i % NGRP) * GS + c];
    qsum[i] = a;
  }
  float2* qz = (float2*)(qmx + NW + HMAX);
  if (KKIND == 2)
    for (int i = tid; i < D / 8 * 32; i += NW * 32) {     // [(4i + t) * 8 + g] = qe[g][(D/4) t + 2i + {0, 1}]
      int gg = i & 7, tt = (i >> 3) & 3, ii = i >> 5, c = (D / 4) * tt + 2 * ii;
      qz[i] = make_float2(qe[gg * D + c], qe[gg * D + c + 1]);
    }
  float qmax = 0.f;
  for (int w = 0; w < NW; ++w) qmax = fmaxf(qmax, qmx[w]);
  Shared sh;
  sh.qe = qe; sh.qsum = qsum; sh.qaff = qaff; sh.qz = qz;
  sh.qnorm = qmax > 0.f ? pow2i(-max(-126, min(126, (int)ceilf(log2f(qmax))))) : 1.f;
  __syncthreads();

  float* dump = (float*)wbase;
  main_warp(p, sh, b, hk, mt0, mt1, wbase, dump);
  if (mt1 <= mt0 && lane < HMAX) { dump[HMAX * D + lane] = -1e30f; dump[HMAX * D + HMAX + lane] = 0.f; }
  tail_warp(p, sh, b, hk, tt0, tt1, TK, TV, dump + DUMP);
  __syncthreads();

  // ---- combine the warps (each a main and a tail state): one partial per block
  const int split = p.split0 + blockIdx.x;
  for (int i = tid; i < ng * D; i += NW * 32) {
    int h = i / D, c = i % D;
    float M = -1e30f;
    for (int w = 0; w < 2 * NW; ++w)
      M = fmaxf(M, ((const float*)(smem + Q_BYTES + (w >> 1) * WARP_BYTES))[(w & 1) * DUMP + HMAX * D + h]);
    float den = 0.f, acc = 0.f;
    for (int w = 0; w < 2 * NW; ++w) {
      const float* d = (const float*)(smem + Q_BYTES + (w >> 1) * WARP_BYTES) + (w & 1) * DUMP;
      float l = d[HMAX * D + HMAX + h];
      if (l > 0.f) { float wt = ex2(d[HMAX * D + h] - M); den += l * wt; acc += d[h * D + c] * wt; }
    }
    i64 hq = hk * ng + h;
    p.op[b * p.sob + hq * p.soh + split * p.sos + c] = den > 0.f ? acc / den : 0.f;
    if (c == 0) p.lp[b * p.slb + hq * p.slh + split] = den > 0.f ? M + log2f(den) : -SK_INF;
  }
  if (!(p.flags & F_MERGE)) return;

  // ---- the last block of this (sequence, KV head) to finish merges every partial (all launches of the call)
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(p.cnt + blockIdx.y, 1) == (int)gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = tid; i < ng * D; i += NW * 32) {
    int h = i / D, c = i % D;
    i64 hq = hk * ng + h;
    const float* l = p.lp + b * p.slb + hq * p.slh;
    float M = -SK_INF;
    for (int k = 0; k < p.s_total; ++k) M = fmaxf(M, __ldcg(l + k));
    float acc = 0.f, den = 0.f;
    if (M != -SK_INF)
      for (int k = 0; k < p.s_total; ++k) {
        float w = ex2(__ldcg(l + k) - M);
        den += w;
        acc += w * __ldcg(p.op + b * p.sob + hq * p.soh + k * p.sos + c);
      }
    float v = den > 0.f ? acc / den : 0.f;
    u16 bits;
    if (p.flags & F_QBF16) { u32 u = __float_as_uint(v); bits = (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
    else { asm("{.reg .b16 h; cvt.rn.f16.f32 h, %1; mov.b16 %0, h;}" : "=h"(bits) : "f"(v)); }
    p.out[b * p.sxb + hq * p.sxh + c] = bits;
  }
  if (tid == 0) p.cnt[blockIdx.y] = 0;   // ready for the next call (and graph replay)
}

// ---------------------------------------------------------------- merge: out[b, h] from S partials
extern "C" __global__ void sk_merge(const float* __restrict__ op, const float* __restrict__ lp, u16* out,
                                    float* lse_out, int S, i64 sob, i64 soh, i64 sos, i64 slb, i64 slh, i64 sxb,
                                    i64 sxh, int hq, int out_bf16) {
  const i64 b = blockIdx.x / hq, h = blockIdx.x % hq;
  const float* l = lp + b * slb + h * slh;
  float M = -SK_INF;
  for (int s = 0; s < S; ++s) M = fmaxf(M, l[s]);
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float acc = 0.f, den = 0.f;
    if (M != -SK_INF)
      for (int s = 0; s < S; ++s) {
        float w = ex2(l[s] - M);
        den += w;
        acc += w * op[b * sob + h * soh + s * sos + c];
      }
    float v = den > 0.f ? acc / den : 0.f;
    u16 bits;
    if (out_bf16) { u32 u = __float_as_uint(v); bits = (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
    else { asm("{.reg .b16 h; cvt.rn.f16.f32 h, %1; mov.b16 %0, h;}" : "=h"(bits) : "f"(v)); }
    out[b * sxb + h * sxh + c] = bits;
    if (lse_out && c == 0) lse_out[blockIdx.x] = den > 0.f ? M + log2f(den) : -SK_INF;
  }
}
