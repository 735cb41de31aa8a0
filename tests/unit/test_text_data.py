"""Instruction data: the LIMA loader, the Python-documentation dataset, chat encoding with answer-only
labels, and the paraphrased / model-generated variants with their on-disk cache."""

import inspect
import json

import pytest

import imprint.data.text as text
from imprint.data.text import (GenerationConfig, InstructionExample, VariantCache, dataset_fingerprint,
                               encode_chat_examples, generate_replies, load_lima_jsonl, model_generated_examples,
                               paraphrase_examples, python_docs_examples, rule_paraphrase, split_examples)
from imprint.models.lm import tiny_llama


@pytest.fixture(scope="module")
def docs():
    return python_docs_examples()


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(0)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lima_loader_reads_conversations(tmp_path):
    path = write_lines(tmp_path / "lima.jsonl", [
        json.dumps({"conversations": ["What is 2+2?", "4.", "Why?", "Arithmetic."], "source": "test"}),
        "",
        json.dumps({"conversations": [" Name a prime. ", "7"]}),
    ])
    examples = load_lima_jsonl(path)
    assert [(e.instruction, e.answer) for e in examples] == [("What is 2+2?", "4."), ("Name a prime.", "7")]
    assert examples[0].source == "test" and examples[1].id == "lima/3"


@pytest.mark.parametrize("bad_line,message", [
    ('{"conversations": ["a", "b"]', "malformed JSON"),
    ('{"messages": ["a", "b"]}', "'conversations'"),
    ('{"conversations": ["only one"]}', "at least two strings"),
    ('{"conversations": ["question", "   "]}', "empty"),
])
def test_lima_loader_names_the_bad_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"conversations": ["q", "a"]}), "", bad_line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        load_lima_jsonl(path)


def test_lima_loader_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_lima_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no conversations"):
        load_lima_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))


def test_python_docs_dataset_is_real_deduplicated_and_fixed(docs):
    assert 900 <= len(docs) <= 2000
    assert len({e.id for e in docs}) == len(docs)
    assert len({text._normalise(e.answer) for e in docs}) == len(docs)
    assert len({text._normalise(e.instruction) for e in docs}) == len(docs)
    assert all(120 <= len(e.answer) <= 700 and e.instruction.strip() for e in docs)
    assert dataset_fingerprint(python_docs_examples()) == dataset_fingerprint(docs)
    by_id = {e.id: e for e in docs}
    split_doc = by_id["builtin-type/str.split"].answer
    assert split_doc.startswith(inspect.getdoc(str.split).split("\n")[0])  # the docstring's own words
    assert {e.source for e in docs} == {"pydoc_data.topics", "stdlib docstrings", "builtin-type docstrings"}


def test_split_is_disjoint_complete_and_stable(docs):
    train, heldout = split_examples(docs, 0.1)
    assert len(train) + len(heldout) == len(docs)
    assert not {e.id for e in train} & {e.id for e in heldout}
    assert 0.05 < len(heldout) / len(docs) < 0.15
    train_again, _ = split_examples(list(reversed(docs)), 0.1)
    assert {e.id for e in train_again} == {e.id for e in train}


def test_encoding_labels_exactly_the_answer(lm):
    examples = [InstructionExample("x", "What is a list?", "A mutable sequence of items.", "t"),
                InstructionExample("y", "Why?", "Because the documentation says so, at length.", "t")]
    enc = encode_chat_examples(lm.tokenizer, examples, max_length=256)
    tok = lm.tokenizer
    for i, example in enumerate(examples):
        n = int(enc.lengths[i])
        answer_ids = enc.labels[i][enc.labels[i] != -100].tolist()
        assert tok.decode(answer_ids) == example.answer + "<|im_end|>\n"
        prompt = tok.apply_chat_template([{"role": "user", "content": example.instruction}], tokenize=False,
                                         add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert (enc.labels[i, :n_prompt] == -100).all() and (enc.labels[i, n_prompt:n] != -100).all()
        assert (enc.input_ids[i, n:] == tok.pad_token_id).all() and (enc.labels[i, n:] == -100).all()
    assert enc.select(1, 2).input_ids.shape == (1, int(enc.lengths[1]))


def test_encoding_rejects_empty_answers_and_no_room(lm):
    good = InstructionExample("g", "Q?", "An answer.", "t")
    with pytest.raises(ValueError, match=r"example 1 \(id 'e'\): the answer is empty after tokenisation"):
        encode_chat_examples(lm.tokenizer, [good, InstructionExample("e", "Q?", "  ", "t")])
    with pytest.raises(ValueError, match="max_length=10"):
        encode_chat_examples(lm.tokenizer, [good], max_length=10)
    with pytest.raises(ValueError, match="examples is empty"):
        encode_chat_examples(lm.tokenizer, [])


def test_rule_paraphrase_is_deterministic_different_and_keeps_code():
    answer = "Return a list of the words, using sep as the separator; see `str.split` for the arguments."
    out = rule_paraphrase(answer)
    assert out == rule_paraphrase(answer) and out != answer and out.strip()
    assert "`str.split`" in out and "give back" in out.lower()
    question = "What does `len` do?"
    rewritten = rule_paraphrase(question, instruction=True)
    assert rewritten != question and "`len`" in rewritten
    assert rule_paraphrase("xyz") != "xyz"  # no rule applies: still a different text
    with pytest.raises(ValueError, match="empty"):
        rule_paraphrase("  ")


def test_generation_is_greedy_and_deterministic(lm):
    config = GenerationConfig(max_new_tokens=6, batch_size=2)
    first = generate_replies(lm, ["What is a list?", "Explain pass.", "Hi"], config)
    assert first == generate_replies(lm, ["What is a list?", "Explain pass.", "Hi"], config)
    assert len(first) == 3 and all(isinstance(r, str) for r in first)
    single = generate_replies(lm, ["Explain pass."], config)  # left padding does not change the reply
    assert single[0] == first[1]


def test_variants_fall_back_to_rules_and_are_cached(tmp_path, lm, monkeypatch):
    examples = [InstructionExample("a", "What is a tuple?", "An immutable sequence.", "t"),
                InstructionExample("b", "What is a set?", "An unordered collection of distinct items.", "t")]
    cache_path = tmp_path / "variants.jsonl"
    echoed = []

    def echo_or_rewrite(model, messages, config, progress=False, reply_prefix=""):
        # the model copies the first input back (rejected), rewrites the others (accepted)
        echoed.extend(messages)
        outs = []
        for m in messages:
            original = m.split("it: ", 1)[1] if m.startswith("Paraphrase this question") else m.split("\n\n", 1)[1]
            closing = '" and more' if reply_prefix.endswith('"') else ""
            outs.append(original + closing if original == examples[0].instruction
                        else "Rewritten: " + original[::-1] + closing)
        return outs

    monkeypatch.setattr(text, "generate_replies", echo_or_rewrite)
    clock = iter(range(100))
    monkeypatch.setattr(text.time, "perf_counter", lambda: float(next(clock)) ** 2)
    config = GenerationConfig(max_new_tokens=8, batch_size=2)
    timings = {}
    para = paraphrase_examples(examples, lm, method="model", config=config, cache_path=cache_path, timings=timings)
    # one batch per kind (two examples, batch size 2): 1 - 0 and 9 - 4 seconds
    assert timings == {"paraphrase": 6.0}
    assert para[0].instruction == rule_paraphrase(examples[0].instruction, instruction=True)
    assert "instruction: rule (fallback)" in para[0].source and "answer: model" in para[0].source
    assert para[1].answer.startswith("Rewritten: ") and para[1].instruction.endswith("?tes a si tahW")
    n_calls = len(echoed)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(text, "generate_replies", fail)
    again = paraphrase_examples(examples, lm, method="model", config=config, cache_path=cache_path, timings=timings)
    assert again == para and len(echoed) == n_calls
    assert timings == {"paraphrase": 6.0}  # the time of the run that generated them, read back from the cache

    monkeypatch.setattr(text, "generate_replies", lambda model, msgs, config, progress=False, reply_prefix="":
                        ["", "Sure."])
    generated = model_generated_examples(para, lm, config=config, cache_path=cache_path, timings=timings)
    assert timings == {"paraphrase": 6.0, "answer": 25.0 - 16.0}
    assert generated[0].answer == para[0].answer and "empty reply" in generated[0].source
    assert generated[1].answer == "Sure." and generated[1].instruction == para[1].instruction
    lines = cache_path.read_text().strip().split("\n")
    assert len(lines) == 6 and len({json.loads(line)["key"] for line in lines}) == 6


def test_cache_never_replaces_an_entry(tmp_path):
    cache = VariantCache(tmp_path / "c.jsonl")
    cache.add([{"key": "k", "text": "first"}])
    cache.add([{"key": "k", "text": "second"}, {"key": "j", "text": "other"}])
    reopened = VariantCache(tmp_path / "c.jsonl")
    assert reopened.get("k")["text"] == "first" and reopened.get("j")["text"] == "other"
    reopened.add([{"key": "r", "text": "x", "method": "rule"}, {"key": "m", "text": "y", "method": "model",
                                                                "seconds": 0.25}])
    assert reopened.seconds(["r", "m", "m"]) == 0.25  # rule-based entries are free; each key counts once
    assert reopened.seconds(["m", "k"]) is None  # "k" was generated without a recorded time
    (tmp_path / "bad.jsonl").write_text('{"key": "a", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        VariantCache(tmp_path / "bad.jsonl")


def test_rule_paraphrases_of_the_dataset_are_all_valid(docs):
    for example in docs[:200]:
        for value, is_instruction in ((example.instruction, True), (example.answer, False)):
            out = rule_paraphrase(value, instruction=is_instruction)
            assert out.strip() and text._normalise(out) != text._normalise(value)


def test_variants_with_the_tiny_model_end_to_end(tmp_path, lm):
    examples = [InstructionExample("a", "What is a tuple?", "An immutable sequence.", "t")]
    config = GenerationConfig(max_new_tokens=5, batch_size=1)
    para = paraphrase_examples(examples, lm, method="model", config=config, cache_path=tmp_path / "v.jsonl")
    gen = model_generated_examples(para, lm, config=config, cache_path=tmp_path / "v.jsonl")
    assert para[0].instruction.strip() and para[0].instruction != examples[0].instruction
    assert gen[0].instruction == para[0].instruction and gen[0].answer.strip()
    with pytest.raises(ValueError, match="paraphraser"):
        paraphrase_examples(examples, None, method="llm", cache_path=tmp_path / "w.jsonl")


def test_python_docs_answers_tokenise_alike_after_the_assistant_header(docs, lm):
    # A grammar block opening with spaces merged with the header's newline into one token when the
    # conversation was tokenised whole, unlike the prompt and answer apart: fine-tuning texts then refused.
    from imprint.gradients.experiment import sft_texts

    assert all(e.answer == e.answer.strip() and e.instruction == e.instruction.strip() for e in docs)
    grammar = [e for e in docs if e.id.startswith(("topics/yield/", "topics/async/"))]
    assert grammar
    texts, prompts = sft_texts(lm.tokenizer, grammar, 256)
    assert len(texts) == len(grammar) and all(p > 0 for p in prompts)
