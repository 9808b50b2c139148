"""Sliding-window cache layers (hybrid models such as Gemma 3: 15 of its 18 layers attend to their last 512 tokens).

On such a layer every method holds what transformers' `DynamicSlidingWindowLayer` holds: the last window - 1
tokens between calls, plus the tokens of a call while it runs (a chunked prefill's queries see back window - 1
tokens from their first). After each call the layer forgets its oldest tokens (`_evict`). A method that can
only forget in whole units (KIVI's per-channel key groups, SmartKV's middle, re-pooled every `realloc_every`
tokens) keeps at most `eviction_lag` tokens more; `get_mask_sizes` reports what the layer holds and where it
starts, so transformers' sliding mask hides those tokens: attention sees exactly the window either way.

Whether a method stores its sliding layers itself or keeps them in 16 bits like DynamicCache is its config's
`sliding_layers` (methods/base.py). Memory reports compare with DynamicCache: on a sliding layer its last
window - 1 tokens (`reference_tokens`), not the whole sequence.
"""
from __future__ import annotations


class SlidingWindow:
    """What `KVLayer` adds for sliding-window layers; on full-attention layers (window None) it changes nothing."""
    is_sliding = False
    sliding_window: int | None = None   # the model layer sees its last `sliding_window` tokens (None: all)
    evicted = 0                         # the oldest tokens forgotten: the layer holds positions [evicted, seq_len)
    seq_len: int

    def set_sliding_window(self, window: int | None) -> None:
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 2):
            raise ValueError(f"sliding_window must be an integer >= 2 or None, got {window!r}")
        self.sliding_window = window
        self.is_sliding = window is not None

    @property
    def held(self) -> int:
        """Tokens the layer stores now (every token on a full-attention layer)."""
        return self.seq_len - self.evicted

    @property
    def reference_tokens(self) -> int:
        """Tokens DynamicCache's layer holds here: all of them, or the last window - 1 on a sliding layer."""
        return self.seq_len if self.sliding_window is None else min(self.seq_len, self.sliding_window - 1)

    @property
    def eviction_lag(self) -> int:
        """At most how many tokens beyond the last window - 1 this layer holds between calls (never attended)."""
        return 0

    def _trim(self) -> None:
        """Forget what no later query can see (all but the last window - 1 tokens), as far as the method can now."""
        if self.sliding_window is not None and self.held >= self.sliding_window:
            self.evicted += self._evict(self.held - (self.sliding_window - 1))

    def _evict(self, count: int) -> int:
        """Forget the `count` oldest stored tokens; return how many were forgotten (fewer when the method forgets
        in whole units only: the rest go on a later call, see `eviction_lag`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold a sliding window (no _evict)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the next call attends over, position of the first): the held tokens and the call's own. Holding
        the last window - 1 tokens this is DynamicSlidingWindowLayer's answer; transformers builds the mask of
        every layer of a kind from the first such layer's answer, so all sliding layers of a cache hold alike."""
        return self.held + query_length, self.evicted

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window
