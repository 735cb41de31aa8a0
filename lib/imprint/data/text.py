"""Instruction/answer text for the gradient-similarity chapter (03): data, variants, chat encoding.

The offline default is about a thousand real, human-written instruction/answer pairs cut from Python's
own documentation: the sections and the object descriptions of the language reference that ships as
``pydoc_data.topics``, and the docstrings of standard-library functions, classes and builtin-type
methods. The answers are the documentation's words (re-flowed and cut at a paragraph or sentence
boundary); the instructions are short questions about the documented object, phrased from a few
templates. Pairs are deduplicated on their normalised answer and instruction and split into train and
held-out by a hash of their identifier, so the split does not depend on the order of discovery. Users
with their own data load LIMA-format JSONL (``{"conversations": [user, assistant, ...]}`` per line).

Variants of each training example: *paraphrased* (instruction and answer rewritten by the model with a
paraphrasing prompt, or by a deterministic rule-based rewriter that is also the fallback when the model's
output is empty or identical to its input) and *model-generated* (the model's own greedy answer to the
paraphrased instruction). Generated text is cached on disk in an append-only JSONL file keyed by
everything that determines it, and reused. :func:`encode_chat_examples` applies the model's chat
template and marks the answer tokens, the only ones the supervised fine-tuning loss counts.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from imprint.runtime.checks import require_choice, require_float, require_int, require_path
from imprint.runtime.io import atomic_write_text, iter_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class InstructionExample:
    """One instruction/answer pair; ``id`` is stable across runs, ``source`` says where the text came from."""

    id: str
    instruction: str
    answer: str
    source: str


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# LIMA-format JSONL


def load_lima_jsonl(path: str | Path) -> list[InstructionExample]:
    """Read LIMA-format JSONL: one ``{"conversations": [user, assistant, ...], "source": ...}`` per line.

    The first user/assistant turn of each conversation becomes an example. A malformed line raises a
    ``ValueError`` naming the file and its line number; blank lines are skipped.
    """
    path = require_path("path", path, kind="file")
    examples = []
    for lineno, where, record in iter_jsonl(path):
        if not isinstance(record, dict) or "conversations" not in record:
            raise ValueError(f"{where}: expected an object with a 'conversations' list")
        turns = record["conversations"]
        if (not isinstance(turns, list) or len(turns) < 2
                or not all(isinstance(t, str) for t in turns[:2])):
            raise ValueError(f"{where}: 'conversations' must be a list of at least two strings "
                             f"(user turn, assistant turn), got {type(turns).__name__}"
                             f"{' of length ' + str(len(turns)) if isinstance(turns, list) else ''}")
        if not turns[0].strip() or not turns[1].strip():
            raise ValueError(f"{where}: the first user or assistant turn is empty")
        source = str(record.get("source", path.stem))
        examples.append(InstructionExample(id=f"{path.stem}/{lineno}", instruction=turns[0].strip(),
                                           answer=turns[1].strip(), source=source))
    if not examples:
        raise ValueError(f"path={str(path)!r}: no conversations in the file")
    return examples


# ---------------------------------------------------------------------------------------------------
# Python's documentation as instruction/answer pairs

_UNDERLINE = re.compile(r"[*=\-^~\"]{3,}")
_ENTRY = re.compile(r"[A-Za-z_][\w.]*\(.*\)|[A-Za-z_]\w*\.[A-Za-z_][\w.]*")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")

STDLIB_MODULES = (
    "builtins", "os", "os.path", "shutil", "glob", "fnmatch", "tempfile", "pathlib", "json", "csv",
    "configparser", "re", "string", "textwrap", "difflib", "unicodedata", "math", "cmath", "statistics",
    "random", "decimal", "fractions", "numbers", "itertools", "functools", "operator", "collections",
    "heapq", "bisect", "copy", "pprint", "enum", "datetime", "calendar", "time", "hashlib", "hmac",
    "secrets", "base64", "binascii", "struct", "codecs", "zlib", "gzip", "bz2", "lzma", "zipfile",
    "tarfile", "pickle", "shelve", "io", "array", "uuid", "ipaddress", "argparse", "logging", "warnings",
    "traceback", "contextlib", "abc", "typing", "dataclasses", "inspect", "dis", "ast", "tokenize", "gc",
    "weakref", "threading", "queue", "subprocess", "socket", "selectors", "signal", "urllib.parse",
    "urllib.request", "http.client", "email.utils", "html", "xml.etree.ElementTree", "shlex", "platform",
    "locale", "gettext", "sys", "types", "graphlib", "filecmp", "linecache", "mimetypes", "timeit",
    "doctest", "pkgutil", "site", "sysconfig", "fileinput", "smtplib", "ftplib", "imaplib",
    "socketserver", "xmlrpc.client", "sqlite3", "zipimport", "runpy",
)
BUILTIN_TYPES = ("str", "bytes", "bytearray", "list", "dict", "set", "frozenset", "int", "float",
                 "memoryview", "range", "slice")

_SECTION_TEMPLATES = ("Explain {t} in Python.", "What does the Python language reference say about {t}?",
                      "Describe {t} in Python.", "How does Python handle {t}?")
_ENTRY_TEMPLATES = ("What does {t} do in Python?", "Explain {t}.", "Describe the Python {t}.",
                    "What is {t} for?")
_API_TEMPLATES = ("What does {t} do?", "Explain the {kind} {t} from the Python standard library.",
                  "How is {t} used in Python?", "Describe the {kind} {t}.")


def reflow(text: str) -> str:
    """Join hard-wrapped lines into paragraphs; keep indented blocks (code, grammar) line by line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", textwrap.dedent(text).strip("\n")):
        lines = block.split("\n")
        if all(line.startswith(" ") for line in lines if line.strip()) or any(
                line.lstrip().startswith(">>>") for line in lines):
            paragraphs.append(block.rstrip())
        else:
            paragraphs.append(" ".join(line.strip() for line in lines if line.strip()))
    return "\n\n".join(p for p in paragraphs if p.strip())


def truncate_text(text: str, max_chars: int) -> str:
    """Whole paragraphs up to ``max_chars``; if the first paragraph is longer, whole sentences of it."""
    paragraphs = text.split("\n\n")
    kept, used = [], 0
    for paragraph in paragraphs:
        if used + len(paragraph) + (2 if kept else 0) > max_chars:
            break
        kept.append(paragraph)
        used += len(paragraph) + (2 if len(kept) > 1 else 0)
    if kept:
        return "\n\n".join(kept)
    sentences = re.split(r"(?<=[.!?])\s+", paragraphs[0])
    out = ""
    for sentence in sentences:
        if len(out) + len(sentence) + 1 > max_chars:
            break
        out = f"{out} {sentence}".strip()
    return out


def _template(templates: Sequence[str], key: str, **fields) -> str:
    return templates[int(_sha(key)[:8], 16) % len(templates)].format(**fields)


def _topic_pairs(max_answer_chars: int) -> list[InstructionExample]:
    import pydoc_data.topics

    pairs = []
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        lines = text.split("\n")
        heads = [i for i in range(len(lines) - 1)
                 if lines[i].strip() and _UNDERLINE.fullmatch(lines[i + 1].strip() or "x")]
        for n, head in enumerate(heads):
            end = heads[n + 1] if n + 1 < len(heads) else len(lines)
            title = lines[head].strip()
            body = truncate_text(reflow("\n".join(lines[head + 2:end])), max_answer_chars)
            key = f"topics/{topic}/{title}"
            phrase = title[0].lower() + title[1:] if title[:4] in ("The ", "An ", "A ") else title
            pairs.append(InstructionExample(key, _template(_SECTION_TEMPLATES, key, t=phrase), body,
                                            "pydoc_data.topics"))
        for i in range(len(lines) - 2):
            line = lines[i]
            if not (_ENTRY.fullmatch(line) and lines[i + 1] == "" and lines[i + 2].startswith("   ")):
                continue
            block = []
            for follow in lines[i + 2:]:
                if follow.strip() and not follow.startswith("   "):
                    break
                block.append(follow)
            body = truncate_text(reflow("\n".join(block)), max_answer_chars)
            key = f"topics/{topic}/{line}"
            pairs.append(InstructionExample(key, _template(_ENTRY_TEMPLATES, key, t=f"`{line}`"), body,
                                            "pydoc_data.topics"))
    return pairs


def _clean_docstring(doc: str) -> str:
    lines = doc.strip().split("\n")
    while lines and (_SIGNATURE_LINE.match(lines[0].strip()) or lines[0].strip() in ("", "--")):
        lines = lines[1:]
    return "\n".join(lines)


def _belongs(obj, module_name: str, module) -> bool:
    names = getattr(module, "__all__", None)
    home = getattr(obj, "__module__", None) or ""
    last = module_name.rsplit(".", 1)[-1]
    return home in (module_name, f"_{last}", "posixpath" if module_name == "os.path" else module_name) or (
        names is not None and getattr(obj, "__name__", None) in names and home.startswith(("_", module_name)))


def _docstring_pairs(max_answer_chars: int) -> list[InstructionExample]:
    pairs = []
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module that this interpreter was built without
            continue
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            is_class = inspect.isclass(obj)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or is_class):
                continue
            if module_name != "builtins" and not _belongs(obj, module_name, module):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            qualified = name if module_name == "builtins" else f"{module_name}.{name}"
            key = f"stdlib/{qualified}"
            kind = "class" if is_class else "function"
            answer = truncate_text(reflow(_clean_docstring(doc)), max_answer_chars)
            pairs.append(InstructionExample(key, _template(_API_TEMPLATES, key, t=f"`{qualified}`", kind=kind),
                                            answer, "stdlib docstrings"))
    import builtins

    for type_name in BUILTIN_TYPES:
        cls = getattr(builtins, type_name)
        for name in sorted(vars(cls)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(cls, name))
            if not doc:
                continue
            qualified = f"{type_name}.{name}"
            key = f"builtin-type/{qualified}"
            answer = truncate_text(reflow(_clean_docstring(doc)), max_answer_chars)
            pairs.append(InstructionExample(key, _template(_API_TEMPLATES, key, t=f"`{qualified}`",
                                                           kind="method"), answer, "builtin-type docstrings"))
    return pairs


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def python_docs_examples(min_answer_chars: int = 120, max_answer_chars: int = 700) -> list[InstructionExample]:
    """All deduplicated instruction/answer pairs from this interpreter's documentation, in a fixed order.

    Instructions and answers are stripped of surrounding whitespace. A pair is dropped when its answer is shorter than ``min_answer_chars`` or when its normalised answer
    or instruction repeats an earlier one (inherited docstrings, aliases). The order is that of
    ``sha256(id)``: fixed for a given interpreter and free of module-by-module runs, so any prefix is a
    fair sample.
    """
    require_int("min_answer_chars", min_answer_chars, minimum=1)
    require_int("max_answer_chars", max_answer_chars, minimum=min_answer_chars)
    seen_answers, seen_instructions, kept = set(), set(), []
    for pair in _topic_pairs(max_answer_chars) + _docstring_pairs(max_answer_chars):
        # as load_lima_jsonl does: an answer opening with whitespace (an indented grammar block) tokenises
        # differently after the assistant header than apart from it
        pair = replace(pair, instruction=pair.instruction.strip(), answer=pair.answer.strip())
        answer_key, instruction_key = _normalise(pair.answer), _normalise(pair.instruction)
        if len(pair.answer) < min_answer_chars or answer_key in seen_answers or instruction_key in seen_instructions:
            continue
        seen_answers.add(answer_key)
        seen_instructions.add(instruction_key)
        kept.append(pair)
    return sorted(kept, key=lambda p: _sha(p.id))


def split_examples(examples: Sequence[InstructionExample], heldout_fraction: float = 0.1
                   ) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """(train, held-out): an example is held out when ``sha256(id)`` falls in the first ``heldout_fraction``."""
    require_float("heldout_fraction", heldout_fraction, minimum=0.0, maximum=1.0)
    threshold = int(heldout_fraction * 2**32)
    train, heldout = [], []
    for example in examples:
        (heldout if int(_sha("split:" + example.id)[:8], 16) < threshold else train).append(example)
    return train, heldout


def dataset_fingerprint(examples: Sequence[InstructionExample]) -> str:
    """sha256 of the examples' ids and texts, in order: equal fingerprints mean equal data."""
    return _sha(json.dumps([asdict(e) for e in examples], ensure_ascii=False))


# ---------------------------------------------------------------------------------------------------
# Chat-template encoding with answer-only labels


@dataclass(frozen=True)
class ChatEncoding:
    """Right-padded token ids; ``labels`` equals ``input_ids`` on answer tokens and -100 elsewhere."""

    input_ids: Int[Tensor, "n seq"]
    labels: Int[Tensor, "n seq"]
    lengths: Int[Tensor, " n"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, start: int, end: int) -> "ChatEncoding":
        """Examples ``start:end``, cut to their longest sequence (right padding keeps that exact)."""
        width = int(self.lengths[start:end].max())
        return ChatEncoding(self.input_ids[start:end, :width], self.labels[start:end, :width],
                            self.lengths[start:end])

    def take(self, index: Tensor) -> "ChatEncoding":
        """The examples at ``index`` (in that order), cut to their longest sequence."""
        index = torch.as_tensor(index, dtype=torch.long)
        lengths = self.lengths[index]
        width = int(lengths.max())
        return ChatEncoding(self.input_ids[index, :width], self.labels[index, :width], lengths)


def encode_chat_examples(tokenizer, examples: Sequence[InstructionExample], max_length: int = 256) -> ChatEncoding:
    """Apply the chat template to (user: instruction, assistant: answer) and label the answer tokens.

    The prompt is the template up to and including the assistant header; the answer tokens are the
    rest of the conversation (answer text and end-of-turn marker), truncated to ``max_length`` tokens in
    all. Raises before returning anything when an answer has no token of its own text or when the prompt
    leaves no room for the answer.
    """
    require_int("max_length", max_length, minimum=2)
    if len(examples) == 0:
        raise ValueError("examples is empty: expected at least one instruction/answer pair")
    rows = []
    for index, example in enumerate(examples):
        user = [{"role": "user", "content": example.instruction}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": example.answer}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(f"the chat template does not render the prompt as a prefix of the conversation "
                             f"(example {index}, id {example.id!r})")
        answer_ids = tokenizer(example.answer.strip(), add_special_tokens=False)["input_ids"]
        if not example.answer.strip() or not answer_ids:
            raise ValueError(f"example {index} (id {example.id!r}): the answer is empty after tokenisation "
                             f"(answer={example.answer[:60]!r})")
        # Prompt and completion are tokenised apart, so that the prompt's tokens are exactly those the
        # model sees when it is asked the question.
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = prompt + tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        if len(prompt) >= max_length:
            raise ValueError(f"example {index} (id {example.id!r}): the prompt takes {len(prompt)} tokens, "
                             f"leaving no answer token within max_length={max_length}")
        rows.append((full[:max_length], len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    return ChatEncoding(input_ids, labels, lengths)


# ---------------------------------------------------------------------------------------------------
# Variants: paraphrased and model-generated

_SYNONYMS = {
    "return": "give back", "returns": "gives back", "returned": "given back", "function": "routine",
    "functions": "routines", "object": "value", "objects": "values", "argument": "parameter",
    "arguments": "parameters", "specified": "given", "specify": "give", "create": "make",
    "creates": "makes", "created": "made", "use": "employ", "used": "employed", "uses": "employs",
    "string": "text string", "strings": "text strings", "default": "standard setting", "raise": "throw",
    "raises": "throws", "raised": "thrown", "must": "has to", "may": "might",
    "also": "additionally", "however": "but", "contain": "hold", "contains": "holds",
    "containing": "holding", "following": "next", "method": "member function", "methods": "member functions",
    "example": "instance",
    "integer": "whole number", "integers": "whole numbers", "number": "numeric value",
    "error": "failure", "describe": "explain", "explain": "describe", "several": "a number of",
    "instead": "in its place", "given": "supplied", "new": "fresh", "only": "solely",
}
_INSTRUCTION_FRAMES = ("Could you tell me: {q}", "I would like to know the following. {q}",
                       "Question about Python: {q}", "{q} Please answer briefly.")


def _match_case(word: str, replacement: str) -> str:
    if word.isupper() and len(word) > 1:
        return replacement.upper()
    if word[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def rule_paraphrase(text: str, *, instruction: bool = False) -> str:
    """Rewrite ``text`` deterministically: word-level synonyms outside code, and a new frame for questions.

    Always differs from ``text`` (a sentence is prepended when no rule applies) and is never empty for a
    non-empty input. Text between backquotes or double quotes is left untouched.
    """
    if not text.strip():
        raise ValueError("text is empty: nothing to paraphrase")
    pieces = re.split(r"(`[^`]*`|\"[^\"]*\")", text)
    out = []
    for piece in pieces:
        if piece.startswith(("`", '"')):
            out.append(piece)
            continue
        out.append(re.sub(r"[A-Za-z]+", lambda m: _match_case(m.group(0), _SYNONYMS[m.group(0).lower()])
                          if m.group(0).lower() in _SYNONYMS else m.group(0), piece))
    rewritten = "".join(out)
    if instruction:
        rewritten = _template(_INSTRUCTION_FRAMES, text, q=rewritten)
    if _normalise(rewritten) == _normalise(text):
        rewritten = ("In other words: " if not instruction else "Put differently: ") + rewritten
    return rewritten


# Small instruction-tuned models answer a question they are asked to rewrite; starting their reply
# with a fixed phrase (and, for questions, an opening quote that the rewrite closes) keeps them rewriting.
PARAPHRASE_PROMPTS = {
    "instruction": ("Paraphrase this question without answering it: {text}",
                    'Here is the question in other words: "'),
    "answer": ("Paraphrase this text without adding anything:\n\n{text}",
               "Here is the same text in other words:\n\n"),
}
PROMPT_VERSION = "v2"
INSTRUCTION_MAX_NEW_TOKENS = 64  # a rewritten question is short; the model keeps talking after it


def _clean_reply(kind: str, reply: str) -> str:
    """The rewrite itself: a question ends at its closing quote or line end."""
    if kind == "instruction":
        reply = re.split(r'"|\n', reply.strip(), maxsplit=1)[0]
    return reply.strip()


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; part of every cache key. ``temperature`` 0 is greedy decoding; above 0 the
    replies are sampled (softmax at that temperature, nucleus ``top_p``), seeded by ``seed``."""

    max_new_tokens: int = 64
    batch_size: int = 16
    repetition_penalty: float = 1.1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        require_int("max_new_tokens", self.max_new_tokens, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_float("repetition_penalty", self.repetition_penalty, minimum=1.0)
        require_float("temperature", self.temperature, minimum=0.0)
        require_float("top_p", self.top_p, minimum=0.0, maximum=1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p=0.0: expected a nucleus in (0, 1]")
        require_int("seed", self.seed, minimum=0)

    def key(self) -> dict:
        """The settings that determine a reply: greedy decoding ignores the sampling fields, so that caches
        written before they existed stay valid."""
        fields = asdict(self)
        if self.temperature == 0.0:
            for name in ("temperature", "top_p", "seed"):
                fields.pop(name)
        return fields


@torch.no_grad()
def generate_replies(lm, user_messages: Sequence[str], config: GenerationConfig, progress: bool = False,
                     reply_prefix: str = "") -> list[str]:
    """The model's reply to each user message, through its chat template (batched, left padded): greedy, or
    sampled when ``config.temperature`` > 0 (each batch seeded from ``config.seed`` and its first index, in
    a forked RNG, so the caller's random state is left alone).

    ``reply_prefix`` is written as the start of the assistant's turn; the reply returned follows it.
    """
    tokenizer = lm.tokenizer
    replies = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        starts = range(0, len(user_messages), config.batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress):
            chunk = user_messages[start:start + config.batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                                   add_generation_prompt=True) + reply_prefix for m in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
            sampling = {"do_sample": False}
            if config.temperature > 0:
                sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
            with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
                torch.manual_seed(config.seed * 1_000_003 + start)
                output = lm.model.generate(**batch, max_new_tokens=config.max_new_tokens,
                                           repetition_penalty=config.repetition_penalty,
                                           pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, **sampling)
            new = output[:, batch["input_ids"].shape[1]:]
            replies.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return replies


class VariantCache:
    """An append-only JSONL file of generated texts, keyed by everything that determines them.

    Entries are only ever added: a key already present keeps its first text. Each update rewrites the
    file atomically with the old entries first, so a killed run loses at most the batch in flight.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{self.path}:{lineno}: malformed cache line ({err.msg})") from None
                    self.entries.setdefault(record["key"], record)

    @staticmethod
    def key(**fields) -> str:
        return _sha(json.dumps(fields, sort_keys=True, ensure_ascii=False))

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def seconds(self, keys: Sequence[str]) -> float | None:
        """Generation seconds recorded for ``keys`` (shared equally within each generated batch), summed.

        Rule-based entries cost nothing; ``None`` if a generated entry recorded no time.
        """
        total = 0.0
        for key in dict.fromkeys(keys):
            record = self.entries[key]
            if "seconds" in record:
                total += float(record["seconds"])
            elif record.get("method") != "rule":
                return None
        return total

    def add(self, records: Sequence[dict]) -> None:
        fresh = [r for r in records if r["key"] not in self.entries]
        if not fresh:
            return
        for record in fresh:
            self.entries[record["key"]] = record
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in self.entries.values()))


def _accept(generated: str, original: str) -> bool:
    return bool(generated.strip()) and _normalise(generated) != _normalise(original) and bool(_normalise(generated))


def _rewrite_all(lm, texts: Sequence[str], kinds: Sequence[str], method: str, config: GenerationConfig,
                 cache: VariantCache, model_name: str, progress: bool) -> tuple[list[tuple[str, str]], float | None]:
    """(text, method actually used) for each input, from the cache when present; their generation seconds."""
    keys = [VariantCache.key(task="paraphrase", method=method, model=model_name if method == "model" else "",
                             prompt=PROMPT_VERSION, config=config.key() if method == "model" else {},
                             kind=kind, text=text) for text, kind in zip(texts, kinds)]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if method == "model" and todo:
        if lm is None:
            raise ValueError("paraphraser='model' needs a language model (lm is None)")
        for kind, (prompt, prefix) in PARAPHRASE_PROMPTS.items():
            mine = [i for i in todo if kinds[i] == kind]
            step = config.batch_size
            for start in range(0, len(mine), step):
                part = mine[start:start + step]
                kind_config = config if kind == "answer" else replace(
                    config, max_new_tokens=min(config.max_new_tokens, INSTRUCTION_MAX_NEW_TOKENS))
                t0 = time.perf_counter()
                replies = generate_replies(lm, [prompt.format(text=texts[i]) for i in part], kind_config,
                                           progress=progress, reply_prefix=prefix)
                each = (time.perf_counter() - t0) / len(part)
                batch = []
                for i, reply in zip(part, replies):
                    rewrite = _clean_reply(kind, reply)
                    ok = _accept(rewrite, texts[i])
                    text = rewrite if ok else rule_paraphrase(texts[i], instruction=kind == "instruction")
                    batch.append({"key": keys[i], "text": text, "method": "model" if ok else "rule (fallback)",
                                  "raw": reply, "seconds": each})
                cache.add(batch)
    elif todo:
        cache.add([{"key": keys[i], "text": rule_paraphrase(texts[i], instruction=kinds[i] == "instruction"),
                    "method": "rule", "raw": ""} for i in todo])
    return [(cache.get(k)["text"], cache.get(k)["method"]) for k in keys], cache.seconds(keys)


def paraphrase_examples(examples: Sequence[InstructionExample], lm=None, *, method: str = "model",
                        config: GenerationConfig = GenerationConfig(), cache_path: str | Path,
                        progress: bool = False, timings: dict | None = None) -> list[InstructionExample]:
    """Each example with its instruction and its answer paraphrased; ``source`` records the method used.

    ``method="model"`` asks ``lm`` with :data:`PARAPHRASE_PROMPTS` (greedy); an output that is empty or
    identical to its input after normalisation is replaced by :func:`rule_paraphrase`. ``timings``, when
    given, receives ``"paraphrase"``: the generation seconds of these variants, in this run or in the runs
    that cached them (:meth:`VariantCache.seconds`).
    """
    require_choice("paraphraser", method, ["model", "rule"])
    cache = VariantCache(cache_path)
    model_name = getattr(lm, "name", "")
    texts = [e.instruction for e in examples] + [e.answer for e in examples]
    kinds = ["instruction"] * len(examples) + ["answer"] * len(examples)
    done, seconds = _rewrite_all(lm, texts, kinds, method, config, cache, model_name, progress)
    if timings is not None:
        timings["paraphrase"] = seconds
    n = len(examples)
    out = []
    for i, example in enumerate(examples):
        (instruction, how_i), (answer, how_a) = done[i], done[n + i]
        out.append(replace(example, instruction=instruction, answer=answer,
                           source=f"paraphrased (instruction: {how_i}; answer: {how_a})"))
    return out


def model_generated_examples(paraphrased: Sequence[InstructionExample], lm, *,
                             config: GenerationConfig = GenerationConfig(), cache_path: str | Path,
                             progress: bool = False, timings: dict | None = None) -> list[InstructionExample]:
    """Each paraphrased instruction with the model's own answer to it (greedy, or sampled: see
    :class:`GenerationConfig`; one call per sample, each with its own ``config.seed``).

    An empty reply falls back to the paraphrased answer, and ``source`` says so. ``timings``, when given,
    receives ``"answer"``: the generation seconds of these answers (see :func:`paraphrase_examples`).
    """
    cache = VariantCache(cache_path)
    keys = [VariantCache.key(task="answer", model=lm.name, prompt=PROMPT_VERSION, config=config.key(),
                             instruction=e.instruction) for e in paraphrased]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    step = config.batch_size
    for start in range(0, len(todo), step):
        part = todo[start:start + step]
        t0 = time.perf_counter()
        replies = generate_replies(lm, [paraphrased[i].instruction for i in part], config, progress=progress)
        each = (time.perf_counter() - t0) / len(part)
        cache.add([{"key": keys[i], "text": r, "method": "model", "raw": r, "seconds": each}
                   for i, r in zip(part, replies)])
    if timings is not None:
        timings["answer"] = cache.seconds(keys)
    out = []
    for example, key in zip(paraphrased, keys):
        reply = cache.get(key)["text"]
        if reply.strip():
            how = "model-generated" if config.temperature == 0 else f"model-sampled (seed {config.seed})"
            out.append(replace(example, answer=reply, source=how))
        else:
            out.append(replace(example, source="model-generated (empty reply: paraphrased answer kept)"))
    return out
