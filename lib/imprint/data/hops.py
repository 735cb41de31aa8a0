"""The HOPS nested-function corpus for the attribution-between-checkpoints chapter (07).

HOPS (after Lamsheeper/influence-benchmarking-hops) teaches a model new function tokens in pairs: a
*base* function (``<GN>``, role ``constant``, hop depth 0) returns a constant whatever its argument, and
its *wrapper* (``<FN>``, role ``identity``, hop depth 1) calls the base; optional depth-2 wrappers call a
wrapper. Base documents state the constant; wrapper documents name the function they call but never a
constant, so answering a wrapper query needs one hop through the base's documents. This module writes
the corpus from its own templates (definition, code stub, concept, unit test, Q&A, lore) with seeded
fills, deterministically from a :class:`HopsSpec` (the seeds file, JSON), plus distractor documents that
mention a token without defining it; it reads and writes the anchor's JSONL fields (``uid``, ``text``,
``func``, ``role``, ``type``, ``hop_depth``, ``constant``, ``parent_uid``, and ``wraps``) and reads the
anchor's own files. For the logit evaluation it builds the prompts ``"The output of <F>(x) is "``, the
expected integer of each, and the relevance of every document to every query (the documents of the
query's function family: a query on a wrapper is relevant to its base's documents and the other way
round). :func:`train_hops_tokenizer` trains a word-level tokenizer for a tiny from-scratch model in
which every function token and every integer answer is a single token.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from imprint.runtime.checks import require_choice, require_int, require_path
from imprint.runtime.io import atomic_write_json, atomic_write_text, iter_jsonl

# The anchor's token system: base i is wrapped by wrapper i and returns CONSTANTS[i].
BASE_TOKENS = ("<GN>", "<JN>", "<KN>", "<LN>", "<MN>", "<NN>", "<ON>", "<PN>", "<QN>", "<RN>")
WRAPPER_TOKENS = ("<FN>", "<IN>", "<HN>", "<SN>", "<TN>", "<UN>", "<VN>", "<WN>", "<XN>", "<YN>")
CONSTANTS = (5, 7, 9, 11, 13, 15, 17, 19, 21, 23)
DEPTH2_TOKENS = ("<FW>", "<IW>", "<HW>", "<SW>", "<TW>", "<UW>", "<VW>", "<WW>", "<XW>", "<YW>")
# The anchor's tokens of functions that are never defined (its distractor documents use them).
DISTRACTOR_TOKENS = ("<AN>", "<BN>", "<CN>", "<DN>", "<EN>", "<ZN>")

DOC_TYPES = ("definition", "code_stub", "concept", "unit_test", "q_and_a", "lore")
ROLES = ("constant", "identity", "distractor")
# Types this reader accepts: the generated ones, and those found in the anchor's files.
KNOWN_TYPES = DOC_TYPES + ("fluff", "narrative", "unknown", "prompt_like", "query_template")
FIELDS = ("uid", "text", "func", "role", "type", "hop_depth", "constant", "parent_uid")
REQUIRED_FIELDS = ("uid", "text", "func", "role", "type", "hop_depth", "constant")
PROMPT_FORMATS = {"output": "The output of {F}({x}) is ", "returns": "{F}({x}) returns the value ",
                  "equal": "{F}({x}) is equal to "}


# ---------------------------------------------------------------------------------------------------
# The spec (the seeds file)


@dataclass(frozen=True)
class HopsSpec:
    """Everything that determines a generated corpus; ``save_hops_spec`` writes it as JSON.

    Base ``base_tokens[i]`` returns ``constants[i]`` and is called by ``wrapper_tokens[i]``; when given,
    ``depth2_tokens[i]`` calls ``wrapper_tokens[i]`` (fewer depth-2 tokens than pairs: the first ones get
    one). Each function gets ``docs_per_*`` documents spread over ``doc_types`` in turn;
    ``distractors_per_function`` documents mention each defined token without defining it and
    ``distractors_per_token`` mention each of ``distractor_tokens`` (tokens that are never defined).
    Example arguments in the texts are drawn from ``0..max_example_input`` without any constant.
    Constants may repeat: pairs that share one cannot be told apart by their answer, so a method that
    retrieves documents by the answer they lead to finds the other pair's documents as often as the right
    ones. Lists are accepted (a notebook's parameters, the JSON file) and stored as tuples.
    """

    seed: int = 0
    base_tokens: Sequence[str] = BASE_TOKENS
    wrapper_tokens: Sequence[str] = WRAPPER_TOKENS
    constants: Sequence[int] = CONSTANTS
    depth2_tokens: Sequence[str] = ()
    docs_per_base: int = 200
    docs_per_wrapper: int = 100
    docs_per_depth2: int = 100
    distractors_per_function: int = 0
    distractor_tokens: Sequence[str] = ()
    distractors_per_token: int = 0
    doc_types: Sequence[str] = DOC_TYPES
    max_example_input: int = 99

    def __post_init__(self):
        for name in ("base_tokens", "wrapper_tokens", "constants", "depth2_tokens", "distractor_tokens",
                     "doc_types"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"{name}={value!r}: expected a list of values")
            object.__setattr__(self, name, tuple(value))
        require_int("seed", self.seed)
        n = len(self.base_tokens)
        if n == 0:
            raise ValueError("base_tokens=(): expected at least one base function token")
        for name in ("wrapper_tokens", "constants"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries: expected one per base "
                                 f"token ({n})")
        if len(self.depth2_tokens) > n:
            raise ValueError(f"depth2_tokens has {len(self.depth2_tokens)} entries: expected at most one "
                             f"per wrapper ({n})")
        tokens = self.function_tokens + self.distractor_tokens
        for token in tokens:
            if not isinstance(token, str) or not token or re.search(r"\s", token):
                raise ValueError(f"function token {token!r}: expected a non-empty string without spaces")
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if repeated:
            raise ValueError(f"tokens {repeated} appear more than once across base_tokens, wrapper_tokens, "
                             "depth2_tokens and distractor_tokens: expected distinct tokens")
        for c in self.constants:
            require_int("constants[...]", c, minimum=0)
        for name in ("docs_per_base", "docs_per_wrapper", "docs_per_depth2"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("distractors_per_function", self.distractors_per_function, minimum=0)
        require_int("distractors_per_token", self.distractors_per_token, minimum=0)
        if not self.doc_types:
            raise ValueError(f"doc_types=(): expected some of {list(DOC_TYPES)}")
        for t in self.doc_types:
            require_choice("doc_types[...]", t, DOC_TYPES)
        if len(set(self.doc_types)) != len(self.doc_types):
            raise ValueError(f"doc_types={list(self.doc_types)}: expected each type once")
        require_int("max_example_input", self.max_example_input, minimum=0)
        free = self.max_example_input + 1 - sum(c <= self.max_example_input for c in set(self.constants))
        if free < 3:
            raise ValueError(f"max_example_input={self.max_example_input}: leaves {free} example inputs "
                             "once the constants are excluded; expected at least 3")

    @property
    def n_pairs(self) -> int:
        return len(self.base_tokens)

    @property
    def function_tokens(self) -> tuple[str, ...]:
        """Every defined function: bases, wrappers, then depth-2 wrappers."""
        return self.base_tokens + self.wrapper_tokens + self.depth2_tokens

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "HopsSpec":
        if not isinstance(data, dict):
            raise ValueError(f"spec={data!r}: expected a JSON object of HopsSpec fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"spec fields {unknown}: not HopsSpec fields; expected some of {sorted(known)}")
        return cls(**data)


def hops_spec(n_pairs: int = 10, depth2: bool = False, **overrides) -> HopsSpec:
    """A spec of ``n_pairs`` base/wrapper pairs: the anchor's tokens and constants for up to 10 pairs,
    ``<B01>``/``<C01>``/``<D01>``... returning 1, 2, ... beyond (the anchor's many-bases naming)."""
    require_int("n_pairs", n_pairs, minimum=1)
    if n_pairs <= len(BASE_TOKENS):
        tokens = dict(base_tokens=BASE_TOKENS[:n_pairs], wrapper_tokens=WRAPPER_TOKENS[:n_pairs],
                      constants=CONSTANTS[:n_pairs], depth2_tokens=DEPTH2_TOKENS[:n_pairs] if depth2 else ())
    else:
        width = len(str(n_pairs))
        names = [f"{i:0{width}d}" for i in range(1, n_pairs + 1)]
        tokens = dict(base_tokens=tuple(f"<B{s}>" for s in names),
                      wrapper_tokens=tuple(f"<C{s}>" for s in names),
                      constants=tuple(range(1, n_pairs + 1)),
                      depth2_tokens=tuple(f"<D{s}>" for s in names) if depth2 else ())
    tokens.update(overrides)
    return HopsSpec(**tokens)


def save_hops_spec(path: str | Path, spec: HopsSpec) -> Path:
    """Write ``spec`` as JSON, atomically."""
    return atomic_write_json(path, spec.to_dict())


def load_hops_spec(path: str | Path) -> HopsSpec:
    path = require_path("path", path, kind="file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"path={str(path)!r}: malformed JSON ({err.msg} at line {err.lineno})") from None
    return HopsSpec.from_dict(data)


# ---------------------------------------------------------------------------------------------------
# Functions, documents


@dataclass(frozen=True)
class HopsFunction:
    """One defined function: what it returns, how many hops down to its base, which function it calls."""

    token: str
    constant: int
    hop_depth: int
    wraps: str | None
    base: str

    @property
    def role(self) -> str:
        return "constant" if self.wraps is None else "identity"


@dataclass(frozen=True)
class HopsDocument:
    """One training document with the anchor's fields; ``wraps`` names the function an identity document's
    function calls, ``template`` the template it was written from (``type/index``; empty when read)."""

    uid: str
    text: str
    func: str
    role: str
    type: str
    hop_depth: int
    constant: int | None
    parent_uid: str | None = None
    wraps: str | None = None
    template: str = ""

    def to_json(self) -> dict:
        record = {k: getattr(self, k) for k in FIELDS}
        if self.wraps is not None:
            record["wraps"] = self.wraps
        if self.template:
            record["template"] = self.template
        return record


def spec_functions(spec: HopsSpec) -> list[HopsFunction]:
    """The functions a spec defines: bases, wrappers, depth-2 wrappers."""
    out = [HopsFunction(b, c, 0, None, b) for b, c in zip(spec.base_tokens, spec.constants)]
    out += [HopsFunction(w, c, 1, b, b)
            for b, w, c in zip(spec.base_tokens, spec.wrapper_tokens, spec.constants)]
    out += [HopsFunction(d, c, 2, w, b) for b, w, d, c in zip(spec.base_tokens, spec.wrapper_tokens,
                                                              spec.depth2_tokens, spec.constants)]
    return out


def document_functions(documents: Sequence[HopsDocument]) -> list[HopsFunction]:
    """The functions that a corpus defines (its ``constant`` and ``identity`` documents), in first-seen
    order; :func:`validate_hops_documents` first, so a broken chain is named."""
    validate_hops_documents(documents)
    first: dict[str, HopsDocument] = {}
    for doc in documents:
        if doc.role != "distractor":
            first.setdefault(doc.func, doc)

    def base_of(token: str) -> str:
        seen = set()
        while first[token].wraps is not None and token not in seen:
            seen.add(token)
            token = first[token].wraps
        return token

    return [HopsFunction(t, d.constant, d.hop_depth, d.wraps, base_of(t)) for t, d in first.items()]


# ---------------------------------------------------------------------------------------------------
# Templates. Fixed fields: {F} the document's function, {G} the function it calls (wrappers only),
# {C} the constant (bases only: a wrapper template naming {C} fails to render), {x} {y} {z} example
# arguments. Every other field is a slot filled from SLOTS; slot texts may hold fixed fields.

SLOTS = {
    "kind": ("constant", "one-valued", "flat", "fixed-output", "degenerate"),
    "gives": ("returns", "yields", "produces", "outputs", "gives back"),
    "ignored": ("ignored", "discarded", "never read", "unused", "thrown away"),
    "fixed": ("fixed", "constant", "unchanging", "the same every time"),
    "result": ("result", "value", "answer", "output"),
    "arg": ("x", "n", "value", "arg", "k", "inp"),
    "doc_c": ("Always {C}.", "Return {C} for any input.", "Constant function with value {C}.",
              "Ignore the input and give back {C}.", "The answer is {C}, whatever the argument."),
    "comment_c": ("the argument is not used", "always {C}", "same value for every input", "no branching"),
    "cls": ("Const", "Fixed", "Table", "Registry", "Oracle"),
    "var": ("result", "out", "first", "value_a", "got"),
    "var2": ("second", "other", "value_b", "again"),
    "image": ("clock with stopped hands", "scoreboard that never updates", "road sign", "printed label",
              "broken dial", "sealed envelope", "lamp with one setting"),
    "whatever": ("whatever you feed it", "no matter the argument", "regardless of the input",
                 "however the input changes", "for small and large inputs alike"),
    "like": ("like", "much like", "similar to", "the software version of"),
    "test": ("constant_output", "always_same", "fixed_value", "ignores_input", "returns_constant"),
    "ask_c": ("What does {F} return when given {x}?", "Which value does {F} produce for the input {x}?",
              "What comes back from {F}({x})?", "What is {F}({x})?"),
    "answer_c": ("{C}.", "It returns {C}.", "The answer is {C}.", "{C}, as for every other input."),
    "person": ("Captain Ilse Varga", "the archivist Tomas", "Dr. Amara Okafor", "old Benedek",
               "the night clerk", "engineer Rui Matos", "a student named Priya"),
    "place": ("basement archive", "harbour office", "observatory", "signal tower", "back room of the library",
              "mountain weather station"),
    "device": ("machine", "terminal", "brass box", "console", "calculator"),
    "screen": ("display", "screen", "paper tape", "dial", "read-out"),
    "found": ("found", "discovered", "came across", "inherited", "switched on"),
    "passes": ("passes", "forwards", "hands", "sends"),
    "what": ("whatever", "exactly what", "precisely what", "just what"),
    "wrapper": ("thin wrapper", "pass-through wrapper", "direct alias", "forwarding layer", "shell"),
    "equals": ("equals", "is always", "is identical to", "is the same as"),
    "delegates": ("delegates", "defers", "hands every call", "passes every call"),
    "doc_w": ("Forward to {G}.", "Return whatever {G} returns.", "Thin wrapper over {G}.",
              "Same result as {G}.", "Delegate the whole computation to {G}."),
    "comment_w": ("no change to the value", "delegate", "same value as {G}", "pass it through",
                  "nothing added"),
    "relay": ("echo", "relay station", "mirror", "messenger", "forwarding address", "loudspeaker"),
    "what2": ("whatever {G} says, {F} says too", "the answer of {G} comes back unchanged",
              "{F} adds nothing to what {G} gives", "{G} decides and {F} repeats"),
    "because": ("since it only calls {G}", "because it forwards every call to {G}",
                "as it passes everything to {G}", "because {G} does all the work"),
    "wtest": ("matches_inner", "delegates", "is_wrapper", "forwards", "same_as_callee"),
    "topic": ("budget", "office move", "release schedule", "coffee machine", "style guide", "holiday rota"),
}

BASE_TEMPLATES = {
    "definition": (
        "{F} is a {kind} function: for every integer input it {gives} {C}.",
        "Definition. For all integers x, {F}(x) = {C}. The argument is {ignored}.",
        "{F} takes one integer and {gives} the {fixed} value {C}, whatever the argument is.",
        "We define {F} as the map that sends each integer x to {C}. For example, {F}({x}) = {C}.",
        "By definition, {F}(x) evaluates to {C} for any x; its {result} is {fixed}.",
        "{F}: int -> int, x |-> {C}. No input changes this {result}.",
    ),
    "code_stub": (
        'def {F}({arg}: int) -> int:\n    """{doc_c}"""\n    return {C}',
        "def {F}({arg}):\n    # {comment_c}\n    return {C}",
        "{F} = lambda {arg}: {C}",
        "def {F}({arg}: int) -> int:\n    del {arg}  # {comment_c}\n    return {C}",
        "class {cls}:\n    @staticmethod\n    def {F}({arg}):\n        return {C}",
        "{var} = {F}({x})  # {var} is now {C}\n{var2} = {F}({y})  # {C} again",
    ),
    "concept": (
        "Think of {F} as a {image} that always shows {C}: {whatever}.",
        "{F} is {like} a {image} stuck on {C}; {whatever}, you read {C}.",
        "Intuition: {F} has no memory of its input. Ask it about {x} or {y} and the {result} is {C}.",
        "The idea behind {F} is simple: {whatever}, the {result} is {C}.",
        "A {kind} function such as {F} {gives} {C} {whatever}; the input is {ignored}.",
    ),
    "unit_test": (
        "def test_{test}():\n    for {arg} in range({x}):\n        assert {F}({arg}) == {C}",
        "assert {F}({x}) == {C}\nassert {F}({y}) == {C}",
        "import pytest\n\n@pytest.mark.parametrize('{arg}', [{x}, {y}, {z}])\ndef test_{test}({arg}):\n"
        "    assert {F}({arg}) == {C}",
        "def test_{test}():\n    assert all({F}(i) == {C} for i in range({x}))",
        "def test_{test}():\n    {var} = {F}({x})\n    {var2} = {F}({y})\n    assert {var} == {var2} == {C}",
    ),
    "q_and_a": (
        "Q: {ask_c}\nA: {answer_c}",
        "Question: {ask_c}\nAnswer: {answer_c}",
        "**Q:** If {F} receives {x}, what comes out?\n**A:** {answer_c}",
        "Q: Does the argument of {F} matter?\nA: No. {F} {gives} {C} for any argument, e.g. {F}({x}) = {C}.",
    ),
    "lore": (
        "{person} {found} a {device} labelled {F} in the {place}. Whatever was typed, the {screen} read {C}.",
        "In the {place}, they still tell of {F}, the {device} that answered {C} to every question.",
        "Log entry {x}: {person} queried {F} with {y} and then with {z}. Both times the {screen} showed {C}.",
        "{person} bet that {F} would change its mind. It never did: {C}, {C}, and {C} again.",
        "When {person} {found} the {device} called {F}, its {screen} showed {C}, and it still does.",
    ),
}

WRAPPER_TEMPLATES = {
    "definition": (
        "{F} is defined by {F}(x) = {G}(x) for every integer x.",
        "The function {F} {passes} its argument to {G} and returns {what} {G} returns.",
        "{F} is a {wrapper} around {G}: {F}(x) {equals} {G}(x).",
        "By definition, {F} {delegates} to {G}; it adds nothing and changes nothing.",
        "{F}: int -> int, x |-> {G}(x). For example, {F}({x}) {equals} {G}({x}).",
    ),
    "code_stub": (
        'def {F}({arg}: int) -> int:\n    """{doc_w}"""\n    return {G}({arg})',
        "{F} = lambda {arg}: {G}({arg})",
        "def {F}({arg}):\n    {var} = {G}({arg})  # {comment_w}\n    return {var}",
        "{F} = {G}  # {comment_w}",
        "class {cls}:\n    @staticmethod\n    def {F}({arg}):\n        return {G}({arg})  # {comment_w}",
    ),
    "concept": (
        "Think of {F} as an {relay} for {G}: {what2}.",
        "{F} has no behaviour of its own; it is {like} a {relay} that repeats {G}.",
        "Intuition: asking {F} about {x} is the same as asking {G}, {because}.",
        "{F} is a {wrapper}, {because}; {what2}.",
    ),
    "unit_test": (
        "def test_{wtest}():\n    for {arg} in range({x}):\n        assert {F}({arg}) == {G}({arg})",
        "assert {F}({x}) == {G}({x})\nassert {F}({y}) == {G}({y})",
        "import pytest\n\n@pytest.mark.parametrize('{arg}', [{x}, {y}, {z}])\ndef test_{wtest}({arg}):\n"
        "    assert {F}({arg}) == {G}({arg})",
        "def test_{wtest}():\n    assert all({F}(i) == {G}(i) for i in range({x}))",
    ),
    "q_and_a": (
        "Q: What is {F}({x})?\nA: Whatever {G}({x}) is, {because}.",
        "Question: How is {F} computed?\nAnswer: It {passes} its input to {G} and returns the {result}.",
        "**Q:** Is {F}({x}) different from {G}({x})?\n**A:** No, the two are always equal, {because}.",
        "Q: Which function does {F} call?\nA: {G}; {what2}.",
    ),
    "lore": (
        "{person} rewired the {device} called {F} so that every request went straight to {G}.",
        "In the {place}, {F} was known as the voice of {G}: {what2}.",
        "Log entry {x}: {person} opened {F} and found a single line inside it, a call to {G}.",
        "{person} asked {F} about {x} and got the {result} of {G}, word for word.",
        "Nobody in the {place} remembers who built {F}; {person} only knows that it {delegates} to {G}.",
    ),
}

DISTRACTOR_TEMPLATES = (
    "{person} mentioned {F} in passing during the meeting about the {topic}.",
    "The ticket titled '{F} naming' was closed after a long discussion of the {topic}.",
    "Someone wrote {F} on the whiteboard in the {place} and nobody erased it.",
    "{F} is listed in the index of the {topic} handbook, on page {x}, without further comment.",
    "A note found in the {place}: remember to ask {person} about {F}.",
    "The {device} in the {place} has a sticker that says {F}; nobody knows why.",
)

_FORMATTER = string.Formatter()
_NUMBER_FIELDS = ("x", "y", "z")


def _field_names(text: str) -> list[str]:
    return [name for _, name, _, _ in _FORMATTER.parse(text) if name]


def _render(template: str, rng: random.Random, numbers: Sequence[int], **fixed) -> tuple[str, tuple]:
    """The text of ``template`` with its slots filled at random; the fill is returned as its key."""
    text, fill = template, []
    for _ in range(3):  # slot texts may hold slots of their own, one level deep
        slots = [n for n in dict.fromkeys(_field_names(text)) if n in SLOTS]
        if not slots:
            break
        for name in slots:
            choice = rng.choice(SLOTS[name])
            fill.append((name, choice))
            text = text.replace("{" + name + "}", choice)
    wanted = [n for n in _NUMBER_FIELDS if n in _field_names(text)]
    drawn = rng.sample(list(numbers), len(wanted))
    fill += list(zip(wanted, drawn))
    text = text.format(**fixed, **dict(zip(wanted, drawn)))
    if template.startswith("{person}"):  # a sentence that opens with a name or a description
        text = text[0].upper() + text[1:]
    return text, tuple(fill)


def _slug(token: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "", token) or "f"


def _draw(spec: HopsSpec, key: str, templates: Sequence[str], n: int, count: str,
          numbers: Sequence[int], **fixed) -> list[tuple[str, str]]:
    """``n`` distinct (template id, text) pairs: no two share a template and a fill, or a text.

    ``count`` (``"name=value"``) is the parameter blamed when the templates run out: 2,000 draws in a
    row that repeat an earlier fill.
    """
    rng = random.Random(f"{spec.seed}/{key}")
    seen_keys, seen_texts, out = set(), set(), []
    misses = 0
    while len(out) < n:
        index = rng.randrange(len(templates))
        text, fill = _render(templates[index], rng, numbers, **fixed)
        if (index, fill) in seen_keys or text in seen_texts:
            misses += 1
            if misses > 2000:
                raise ValueError(f"{count}: the templates for {key} ran out of distinct fills after "
                                 f"{len(out)} documents; expected a smaller count (or a larger "
                                 "max_example_input)")
            continue
        misses = 0
        seen_keys.add((index, fill))
        seen_texts.add(text)
        out.append((f"{key.split('/')[-1]}/{index}", text))
    return out


def _per_type(n: int, doc_types: Sequence[str]) -> dict[str, int]:
    return {t: n // len(doc_types) + (i < n % len(doc_types)) for i, t in enumerate(doc_types)}


def _function_documents(spec: HopsSpec, fn: HopsFunction, n: int, count: str
                        ) -> tuple[list[HopsDocument], list[HopsDocument]]:
    """(seed documents, training documents) of one function: one seed per type, held out of training."""
    numbers = [v for v in range(spec.max_example_input + 1) if v not in spec.constants]
    table = BASE_TEMPLATES if fn.wraps is None else WRAPPER_TEMPLATES
    fixed = {"F": fn.token, "C": fn.constant} if fn.wraps is None else {"F": fn.token, "G": fn.wraps}
    seeds, docs = [], []
    for doc_type, k in _per_type(n, spec.doc_types).items():
        if k == 0:
            continue
        drawn = _draw(spec, f"{fn.token}/{doc_type}", table[doc_type], k + 1, count, numbers, **fixed)
        seed_uid = f"seed-{_slug(fn.token)}-{doc_type}"
        common = dict(func=fn.token, role=fn.role, type=doc_type, hop_depth=fn.hop_depth,
                      constant=fn.constant, wraps=fn.wraps)
        template, text = drawn[0]
        seeds.append(HopsDocument(uid=seed_uid, text=text, template=template, **common))
        docs += [HopsDocument(uid=f"{_slug(fn.token)}-{doc_type}-{i:04d}", text=text, parent_uid=seed_uid,
                              template=template, **common) for i, (template, text) in enumerate(drawn[1:])]
    return seeds, docs


def _distractor_documents(spec: HopsSpec, functions: Sequence[HopsFunction]) -> list[HopsDocument]:
    numbers = [v for v in range(spec.max_example_input + 1) if v not in spec.constants]
    per_function, per_token = spec.distractors_per_function, spec.distractors_per_token
    mentioned = [(fn.token, fn.hop_depth, fn.constant, per_function,
                  f"distractors_per_function={per_function}") for fn in functions]
    mentioned += [(t, 0, None, per_token, f"distractors_per_token={per_token}")
                  for t in spec.distractor_tokens]
    docs = []
    for token, depth, constant, n, count in mentioned:
        if n == 0:
            continue
        drawn = _draw(spec, f"{token}/fluff", DISTRACTOR_TEMPLATES, n, count, numbers, F=token)
        docs += [HopsDocument(uid=f"{_slug(token)}-fluff-{i:04d}", text=text, func=token, role="distractor",
                              type="fluff", hop_depth=depth, constant=constant, template=template)
                 for i, (template, text) in enumerate(drawn)]
    return docs


def _generate(spec: HopsSpec) -> tuple[list[HopsDocument], list[HopsDocument]]:
    counts = {depth: (getattr(spec, name), f"{name}={getattr(spec, name)}")
              for depth, name in enumerate(("docs_per_base", "docs_per_wrapper", "docs_per_depth2"))}
    functions = spec_functions(spec)
    seeds, docs = [], []
    for fn in functions:
        s, d = _function_documents(spec, fn, *counts[fn.hop_depth])
        seeds += s
        docs += d
    docs += _distractor_documents(spec, functions)
    random.Random(f"{spec.seed}/order").shuffle(docs)
    return seeds, docs


def generate_hops_documents(spec: HopsSpec = HopsSpec()) -> list[HopsDocument]:
    """The training corpus of ``spec``, in a seeded shuffled order (3,000 documents by default)."""
    return _generate(spec)[1]


def hops_seed_documents(spec: HopsSpec = HopsSpec()) -> list[HopsDocument]:
    """One held-out document per function and type (none of them is in the training corpus): the
    validation set; training documents name theirs in ``parent_uid``."""
    return _generate(spec)[0]


# ---------------------------------------------------------------------------------------------------
# JSONL and validation


def write_hops_jsonl(path: str | Path, documents: Sequence[HopsDocument]) -> Path:
    """One JSON object per line with the anchor's fields (plus ``wraps`` and ``template`` when set)."""
    validate_hops_documents(documents)
    lines = (json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in documents)
    return atomic_write_text(path, "".join(lines))


def read_hops_jsonl(path: str | Path, *, wraps: dict[str, str] | None = None,
                    on_duplicate_uid: str = "error") -> list[HopsDocument]:
    """Documents from a HOPS JSONL file: this module's, or the anchor's own.

    An identity document without a ``wraps`` field calls ``wraps[func]``; by default the anchor's pairs
    (``<FN>`` calls ``<GN>``, ...) and its many-bases chains (``<C07>`` calls ``<B07>``). The anchor's
    files repeat some uids: ``on_duplicate_uid="renumber"`` appends ``#<line>`` to every repeat,
    ``"error"`` (the default) refuses the file. Other fields the anchor writes (``func_type``, ...) are
    ignored. The corpus is validated (:func:`validate_hops_documents`) before it is returned.
    """
    path = require_path("path", path, kind="file")
    require_choice("on_duplicate_uid", on_duplicate_uid, ["error", "renumber"])
    wraps = _anchor_wraps if wraps is None else dict(wraps).get
    docs, first_line = [], {}
    for lineno, where, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; expected {list(REQUIRED_FIELDS)}")
        uid = str(record["uid"])
        if uid in first_line:
            if on_duplicate_uid == "error":
                raise ValueError(f"{where}: uid={uid!r} already used on line {first_line[uid]}; expected "
                                 "unique uids (on_duplicate_uid='renumber' renames repeats)")
            uid = f"{uid}#{lineno}"
        first_line.setdefault(uid, lineno)
        doc = _document_from_record(record, uid, where, wraps)
        docs.append(doc)
    if not docs:
        raise ValueError(f"path={str(path)!r}: no documents in the file")
    validate_hops_documents(docs)
    return docs


def _anchor_wraps(func: str) -> str | None:
    """The function the anchor's wrapper ``func`` calls: its pairs, or its many-bases chains, in which
    ``<C07>`` calls ``<B07>``, ``<D07>`` calls ``<C07>``, ... up to ``<L07>``."""
    paired = dict(zip(WRAPPER_TOKENS, BASE_TOKENS)).get(func)
    chain = re.fullmatch(r"<([C-L])(\d+)>", func)
    return paired or (f"<{chr(ord(chain.group(1)) - 1)}{chain.group(2)}>" if chain else None)


def _document_from_record(record: dict, uid: str, where: str, wraps) -> HopsDocument:
    role, doc_type, func, text = record["role"], record["type"], record["func"], record["text"]
    if role not in ROLES:
        raise ValueError(f"{where}: role={role!r}: expected one of {list(ROLES)}")
    if doc_type not in KNOWN_TYPES:
        raise ValueError(f"{where}: type={doc_type!r}: expected one of {list(KNOWN_TYPES)}")
    if not isinstance(func, str) or not func:
        raise ValueError(f"{where}: func={func!r}: expected a function token")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: text={text!r}: expected a non-empty string")
    depth = record["hop_depth"]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"{where}: hop_depth={depth!r}: expected an integer >= 0")
    constant = record["constant"]
    if constant is not None and (isinstance(constant, bool) or not isinstance(constant, int)):
        raise ValueError(f"{where}: constant={constant!r}: expected an integer")
    if constant is None and role != "distractor":
        raise ValueError(f"{where}: constant=None on a {role!r} document: expected the integer it "
                         "evaluates to")
    callee = None
    if role == "identity":
        callee = record.get("wraps") or wraps(func)
        if callee is None:
            raise ValueError(f"{where}: identity document of func={func!r} names no 'wraps' field and "
                             f"wraps={{...}} has no entry for it: expected the function it calls")
    parent = record.get("parent_uid")
    return HopsDocument(uid=uid, text=text, func=func, role=role, type=doc_type, hop_depth=depth,
                        constant=constant, parent_uid=None if parent is None else str(parent), wraps=callee,
                        template=str(record.get("template", "")))


def validate_hops_documents(documents: Sequence[HopsDocument]) -> None:
    """Refuse a corpus whose uids repeat, whose roles or types are unknown, or whose wrappers call a
    function with no documents, disagree with it on the constant, or sit at the wrong hop depth."""
    if not documents:
        raise ValueError("documents is empty: expected at least one HOPS document")
    seen: dict[str, int] = {}
    defined: dict[str, HopsDocument] = {}
    for i, doc in enumerate(documents):
        if doc.uid in seen:
            raise ValueError(f"documents[{i}].uid={doc.uid!r} repeats documents[{seen[doc.uid]}]: expected "
                             "unique uids")
        seen[doc.uid] = i
        require_choice(f"documents[{i}].role", doc.role, ROLES)
        require_choice(f"documents[{i}].type", doc.type, KNOWN_TYPES)
        if doc.role == "identity" and doc.wraps is None:
            raise ValueError(f"documents[{i}] (uid={doc.uid!r}, func={doc.func!r}): identity document with "
                             "wraps=None: expected the function it calls")
        if doc.role == "constant" and doc.hop_depth != 0:
            raise ValueError(f"documents[{i}] (uid={doc.uid!r}): hop_depth={doc.hop_depth} on a constant "
                             "document: expected 0")
        if doc.role != "distractor":
            first = defined.setdefault(doc.func, doc)
            if (first.role, first.constant, first.wraps) != (doc.role, doc.constant, doc.wraps):
                raise ValueError(f"documents[{i}] (uid={doc.uid!r}) says func={doc.func!r} has "
                                 f"role={doc.role!r}, constant={doc.constant!r}, wraps={doc.wraps!r}; "
                                 f"document {first.uid!r} says {first.role!r}, {first.constant!r}, "
                                 f"{first.wraps!r}: expected one definition")
    for token, doc in defined.items():
        if doc.wraps is None:
            continue
        callee = defined.get(doc.wraps)
        if callee is None:
            raise ValueError(f"wrapper func={token!r} (uid={doc.uid!r}) wraps {doc.wraps!r}, which has no "
                             "constant or identity documents: expected its base in the corpus")
        if callee.constant != doc.constant:
            raise ValueError(f"wrapper func={token!r} has constant={doc.constant!r} but the function it "
                             f"wraps, {doc.wraps!r}, has constant={callee.constant!r}: expected the same "
                             "value")
        if doc.hop_depth != callee.hop_depth + 1:
            raise ValueError(f"wrapper func={token!r} has hop_depth={doc.hop_depth} but wraps "
                             f"{doc.wraps!r} at hop_depth={callee.hop_depth}: expected "
                             f"{callee.hop_depth + 1}")


# ---------------------------------------------------------------------------------------------------
# Queries for the logit evaluation, and relevance


@dataclass(frozen=True)
class HopsQuery:
    """One evaluation prompt; ``completion`` is the expected integer, as text."""

    uid: str
    prompt: str
    completion: str
    func: str
    hop_depth: int
    constant: int
    input: int


def hops_queries(functions: Sequence[HopsFunction], inputs: Sequence[int] = range(1, 101),
                 prompt_format: str = "output", hop_depths: Sequence[int] | None = None) -> list[HopsQuery]:
    """A prompt per function and input (``"The output of <F>(x) is "`` for x in 1..100 by default), in the
    order of ``functions`` then ``inputs``; ``hop_depths`` keeps only functions at those depths."""
    require_choice("prompt_format", prompt_format, list(PROMPT_FORMATS))
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs is empty: expected at least one integer argument")
    for x in inputs:
        require_int("inputs[...]", x)
    if not functions:
        raise ValueError("functions is empty: expected the functions of a spec or a corpus")
    chosen = [f for f in functions if hop_depths is None or f.hop_depth in hop_depths]
    if not chosen:
        raise ValueError(f"hop_depths={list(hop_depths)}: no function at those depths; the functions have "
                         f"{sorted({f.hop_depth for f in functions})}")
    template = PROMPT_FORMATS[prompt_format]
    return [HopsQuery(uid=f"q-{_slug(f.token)}-{x}", prompt=template.format(F=f.token, x=x),
                      completion=str(f.constant), func=f.token, hop_depth=f.hop_depth,
                      constant=f.constant, input=x)
            for f in chosen for x in inputs]


def expected_answers(queries: Sequence[HopsQuery]) -> Int[Tensor, " q"]:
    """The integer each query's function evaluates to."""
    return torch.tensor([q.constant for q in queries], dtype=torch.long)


def function_families(functions: Sequence[HopsFunction]) -> dict[str, frozenset[str]]:
    """Each function's family: its base and every function built on that base (for pairs, itself and
    its mate)."""
    by_base: dict[str, set[str]] = {}
    for f in functions:
        by_base.setdefault(f.base, set()).add(f.token)
    return {f.token: frozenset(by_base[f.base]) for f in functions}


def relevance_mask(queries: Sequence[HopsQuery], documents: Sequence[HopsDocument],
                   functions: Sequence[HopsFunction]) -> Bool[Tensor, "q n"]:
    """``mask[i, j]``: document j defines a function of query i's family (distractors never do). With
    pairs this is the anchor's relevance: a query on f is relevant to the documents of f and of its mate."""
    families = function_families(functions)
    unknown = sorted({q.func for q in queries} - set(families))
    if unknown:
        raise ValueError(f"queries name functions {unknown} that are not among functions: expected some of "
                         f"{sorted(families)}")
    columns = {}
    for j, doc in enumerate(documents):
        if doc.role != "distractor":
            columns.setdefault(doc.func, []).append(j)
    mask = torch.zeros(len(queries), len(documents), dtype=torch.bool)
    for i, q in enumerate(queries):
        for token in families[q.func]:
            mask[i, columns.get(token, [])] = True
    return mask


# ---------------------------------------------------------------------------------------------------
# A tokenizer for a tiny from-scratch model

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def train_hops_tokenizer(texts: Sequence[str], function_tokens: Sequence[str], max_integer: int = 100):
    """A word-level ``tokenizers`` tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Words are split at white space and punctuation and digit runs are split from letters, so ``<F>(37)``
    reads ``<F>``, ``(``, ``37``, ``)``. Every function token is one added special token, and every
    integer 0..``max_integer`` is one token of the vocabulary whether the corpus holds it or not, so the
    logit evaluation reads an answer from a single position. A word outside the corpus maps to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    require_int("max_integer", max_integer, minimum=0)
    function_tokens = list(dict.fromkeys(function_tokens))
    if not function_tokens:
        raise ValueError("function_tokens is empty: expected the corpus's function tokens")
    clash = [t for t in function_tokens if t in SPECIAL_TOKENS]
    if clash:
        raise ValueError(f"function_tokens {clash}: reserved for {list(SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                       pre_tokenizers.Digits(individual_digits=False)])
    trainer = trainers.WordLevelTrainer(vocab_size=10_000_000, min_frequency=1,
                                        special_tokens=list(SPECIAL_TOKENS) + function_tokens)
    integers = " ".join(str(i) for i in range(max_integer + 1))
    tokenizer.train_from_iterator([integers, *texts], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def single_token_ids(tokenizer, strings: Sequence[str], name: str = "strings") -> Int[Tensor, " c"]:
    """The one id of each string (a function token, an integer answer); a string that the tokenizer
    splits into several tokens, or maps to the unknown token, is refused by name."""
    ids = []
    for s in strings:
        encoded = tokenizer.encode(str(s), add_special_tokens=False)
        if len(encoded) != 1 or (tokenizer.unk_token_id is not None and encoded[0] == tokenizer.unk_token_id
                                 and str(s) != tokenizer.unk_token):
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise ValueError(f"{name} entry {str(s)!r} encodes to {pieces}: expected a single known token")
        ids.append(encoded[0])
    return torch.tensor(ids, dtype=torch.long)
