"""SmartKVLM: lm-evaluation-harness's model interface over any smartkv cache, registered as `--model smartkv`.

    lm_eval.simple_evaluate(model="smartkv", model_args="pretrained=smollm2,method=smartkv,budget=4",
                            tasks=["smartkv_qa"])

Every request runs through a fresh cache of the method in the project's measured decode loop
(`bench.run.generation.decode`): the context is prefilled, then tokens go in one forward call at a time, so
each later token reads what the cache stored (quantized). Log-likelihood requests teacher-force the continuation
that way (in one forward call the continuation would attend to its own tokens at full precision and a quantized
cache would barely matter); generation stops at EOS, at the task's stop strings or at max_gen_toks. Requests run
one at a time (batch_size is accepted and ignored). Tokenization follows lm-eval's HFLM: no special tokens,
trailing spaces of a context moved to its continuation, an empty context replaced by the prefix token (BOS, else
EOS), left truncation to max_length. `requests_log` keeps each request's timings and true bytes (serving metrics).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import smartkv
from smartkv.bench.run.generation import Decoded, decode, greedy, sampler
from smartkv.data.inputs import encode
from smartkv.models import ModelHandle, load_model

log = logging.getLogger(__name__)

MODEL_NAME = "smartkv"
MODEL_ARGS = ("pretrained", "method", "device", "dtype", "revision", "trust_remote_code", "max_length",
              "max_gen_toks", "batch_size", "max_batch_size")


@dataclass
class RequestStats:
    """One request as a server would see it, and the true bytes its cache held at the end."""
    request_type: str
    context_tokens: int
    output_tokens: int
    prefill_ms: float
    decode_ms: float
    decode_steps: int
    ttft_ms: float | None
    e2e_ms: float | None
    kv_total_bytes: int
    kv_fp16_bytes: int
    memory: dict


@register_model(MODEL_NAME)
class SmartKVLM(TemplateLM):
    """An lm-eval model whose requests go through `smartkv.make_cache(method, model, **method_params)`.

    Model arguments: pretrained (a name `smartkv.models.load_model` takes: smollm2, tiny-llama, an HF id or a
    local folder), method (fp16, int8, int4, kivi, smartkv), any of the method's parameters (budget=4, ...),
    device, dtype, revision, trust_remote_code, max_length (default: the model's context), max_gen_toks (when
    a task names none, 256). `SmartKVLM.from_handle` wraps a model already loaded.
    """

    def __init__(self, pretrained: str = "smollm2", method: str = "fp16", device: str | None = "auto",
                 dtype: str | None = "auto", revision: str | None = None, trust_remote_code: bool = False,
                 max_length: int | None = None, max_gen_toks: int = 256, batch_size=1, max_batch_size=None,
                 handle: ModelHandle | None = None, **method_params):
        super().__init__()
        self.config = smartkv.make_config(method, **method_params)  # a bad argument fails before a model loads
        if str(batch_size) not in ("1", "None", "auto"):
            log.info("smartkv runs requests one at a time; batch_size=%s is ignored", batch_size)
        self.handle = handle or load_model(str(pretrained), device=device or "auto", dtype=dtype,
                                           revision=revision, trust_remote_code=bool(trust_remote_code))
        self.method, self.method_params = method, dict(method_params)
        self.tokenizer = self.handle.tokenizer
        self._max_length = int(max_length) if max_length else self._model_max_length()
        self.max_gen_toks = int(max_gen_toks)
        self.requests_log: list[RequestStats] = []

    @classmethod
    def from_handle(cls, handle: ModelHandle, method: str = "fp16", **kwargs) -> "SmartKVLM":
        return cls(pretrained=handle.name, method=method, handle=handle, **kwargs)

    # --- what lm-eval asks of a model ------------------------------------------------------------------------

    @property
    def model(self):
        return self.handle.model

    @property
    def device(self):
        return self.handle.device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.handle.name)).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"smartkv_model": self.handle.name, "smartkv_method": self.method,
                "smartkv_method_params": self.method_params, "smartkv_version": smartkv.__version__}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode(self.tokenizer, string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for key, context, continuation in requests:
            result = self._score(context, continuation, "loglikelihood")
            self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            (string,) = request.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(ctx, cont, "loglikelihood_rolling")[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            text = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    # --- through the cache ----------------------------------------------------------------------------------

    def _model_max_length(self) -> int:
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(getattr(config, attr, None), int):
                return getattr(config, attr)
        return int(min(getattr(self.tokenizer, "model_max_length", 2048), 1 << 20))

    def _run(self, request_type: str, ids: list[int], n: int, **kwargs) -> Decoded:
        cache = smartkv.make_cache(self.config, self.model)
        decoded = decode(self.model, ids, cache, n, **kwargs)
        report = cache.memory_report()
        self.requests_log.append(RequestStats(
            request_type, len(ids), len(decoded.tokens), decoded.prefill_ms, decoded.decode_ms,
            decoded.decode_steps, decoded.ttft_ms, decoded.e2e_ms, report.total_bytes, report.fp16_bytes,
            report.as_dict()))
        return decoded

    def _score(self, context: list[int], continuation: list[int], request_type: str) -> tuple[float, bool]:
        """Log-likelihood of `continuation` after `context`, fed one token at a time through the cache."""
        if not continuation:
            return 0.0, True
        whole = (list(context) + list(continuation))[-(self.max_length + 1):]
        n = min(len(continuation), len(whole) - 1)
        prompt, target = whole[:-n], whole[-n:]
        decoded = self._run(request_type, prompt, n, forced=target)
        logprobs = torch.log_softmax(decoded.logits.float(), dim=-1)                    # (n, vocab)
        wanted = torch.tensor(target)
        total = float(logprobs.gather(1, wanted[:, None]).sum())
        return total, bool((logprobs.argmax(-1) == wanted).all())

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
        max_gen = int(kwargs.pop("max_gen_toks"))
        ids = self.tok_encode(context)[-max(1, self.max_length - max_gen):] or [self.prefix_token_id]
        choose = greedy
        if kwargs.get("do_sample"):
            generator = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ())))  # lm-eval seeds torch
            choose = sampler(generator, kwargs.get("temperature"), kwargs.get("top_p"), kwargs.get("top_k"))
        window = max((len(s) for s in until), default=0) + 2  # tokens: each holds a character or more

        def stop(tokens: list[int]) -> bool:
            tail = self.tok_decode(tokens[-window:])
            return any(s in tail for s in until)

        decoded = self._run("generate_until", ids, max_gen, choose=choose, keep_logits=False,
                            eos_ids=frozenset({self.eot_token_id}), stop=stop if until else None)
        tokens = [t for t in decoded.tokens if t != self.eot_token_id]
        return postprocess_generated_text(self.tok_decode(tokens), until, None)
