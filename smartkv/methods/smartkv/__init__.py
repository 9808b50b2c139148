"""`smartkv`: attention-importance mixed precision. Tokens that receive much attention keep more bits.

Layout of one layer, positions in order:
  sinks   - the first `sink_tokens` tokens, full precision (attention sinks)
  middle  - quantized per token (groups of `group_size` channels); keys and values each have their own width
            per (KV head, token) from `widths`, kept as 2-bit level maps; one dense pool per width holds the
            codes of its tokens in position order, every (batch, head) row has the same count per width
            (see policy.cascade_assign)
  window  - the most recent tokens, full precision; every `realloc_every` tokens the oldest leave the window
            (keeping `recent_window`) and the whole middle is re-allocated: new tokens get any width, stored
            tokens can only be demoted (re-quantized from their codes), the budget holds over the middle.
Keys decide quality (an error in a key moves the softmax, an error in a value is averaged away), so:
  - keys get `key_value_gap` more bits than values on average (the mean of the two stays `budget`);
  - keys are normalised per channel (`key_norm`) with statistics of the prompt, removing the outlier channels
    that wreck low-bit per-token keys (KIVI's reason for per-channel keys) while keeping the per-token layout
    mixed precision needs; q . (s * k_hat + mu) = (q * s) . k_hat + q . mu, so the query side pays nothing;
  - `rotate` applies a Hadamard rotation to the normalised keys (and values) before per-token quantization,
    spreading what outliers remain over all channels of a group (orthogonal: the query is rotated alike).
Importance (smartkv.core.importance): the mean attention a token received from the queries that could see it,
stored as 8-bit log codes; the number of queries that saw each token is derived from the observed positions.
Metadata counted in `_account`: group scales and zeros, the level maps, importance codes, the observed query
ranges, the key normalisation vectors.
"""
from __future__ import annotations

from smartkv.methods import register
from smartkv.methods.smartkv.config import SmartKV
from smartkv.methods.smartkv.layer import SmartKVLayer
from smartkv.methods.smartkv.realloc import _indices
from smartkv.methods.smartkv.storage import UNSEEN, hadamard

register(SmartKV)

__all__ = ["UNSEEN", "SmartKV", "SmartKVLayer", "hadamard"]
