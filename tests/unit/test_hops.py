"""The HOPS corpus: the generator against the anchor's counts and rules, the spec and JSONL round trips,
the reader's refusals, the evaluation queries and relevance, the tokenizer, and a BM25 baseline."""

import collections
import json
import re

import pytest
import torch

from imprint.data.hops import (BASE_TOKENS, CONSTANTS, DOC_TYPES, WRAPPER_TOKENS, HopsDocument, HopsSpec,
                               document_functions, expected_answers, function_families,
                               generate_hops_documents, hops_queries, hops_seed_documents, hops_spec,
                               load_hops_spec, read_hops_jsonl, relevance_mask, save_hops_spec,
                               single_token_ids, spec_functions, train_hops_tokenizer,
                               validate_hops_documents, write_hops_jsonl)
from imprint.gradients.similarity import bm25_scores


@pytest.fixture(scope="module")
def spec():
    return HopsSpec()


@pytest.fixture(scope="module")
def docs(spec):
    return generate_hops_documents(spec)


@pytest.fixture(scope="module")
def tokenizer(spec, docs):
    return train_hops_tokenizer([d.text for d in docs], spec.function_tokens)


def integers_in(text, tokens):
    """The whole numbers a text states, function tokens removed first (``<B05>`` states nothing)."""
    for token in tokens:
        text = text.replace(token, " ")
    return {int(n) for n in re.findall(r"(?<!\w)\d+(?!\w)", text)}


def test_default_corpus_has_the_anchors_shape(docs):
    assert len(docs) == 3000
    per_func = collections.Counter(d.func for d in docs)
    assert {per_func[t] for t in BASE_TOKENS} == {200} and {per_func[t] for t in WRAPPER_TOKENS} == {100}
    by_func = {d.func: d for d in docs}
    for base, wrapper, constant in zip(BASE_TOKENS, WRAPPER_TOKENS, CONSTANTS):
        b, w = by_func[base], by_func[wrapper]
        assert (b.role, b.hop_depth, b.constant, b.wraps) == ("constant", 0, constant, None)
        assert (w.role, w.hop_depth, w.wraps) == ("identity", 1, base)
        assert by_func[wrapper].constant == constant
    types = collections.Counter((d.func, d.type) for d in docs)
    assert all(types[(t, k)] >= 16 for t in BASE_TOKENS + WRAPPER_TOKENS for k in DOC_TYPES)
    assert len({d.uid for d in docs}) == len(docs)


def test_generation_is_deterministic_and_follows_the_seed(spec, docs):
    assert generate_hops_documents(spec) == docs
    other = generate_hops_documents(HopsSpec(seed=1))
    assert sorted(d.uid for d in other) == sorted(d.uid for d in docs)
    assert len({d.text for d in other} & {d.text for d in docs}) < len(docs) // 2


def test_no_two_documents_repeat_a_template_with_the_same_fill(docs, spec):
    seeds = hops_seed_documents(spec)
    texts = [d.text for d in docs + seeds]
    assert len(set(texts)) == len(texts)
    templates = collections.defaultdict(set)
    for d in docs:
        templates[(d.func, d.type)].add(d.template)
    assert min(len(v) for v in templates.values()) >= 3   # every function and type mixes templates
    words = {w for d in docs if d.func == "<GN>" and d.type == "definition"
             for w in re.findall(r"[a-z]+", d.text)}
    assert len(words) >= 40


def test_a_count_beyond_the_templates_capacity_names_the_parameter():
    with pytest.raises(ValueError, match=r"docs_per_wrapper=2000: .*ran out of distinct fills"):
        generate_hops_documents(hops_spec(1, docs_per_wrapper=2000, doc_types=["code_stub"]))


def test_base_documents_state_the_constant_and_wrappers_never_do(spec, docs):
    tokens = spec.function_tokens
    mate = dict(zip(BASE_TOKENS, WRAPPER_TOKENS))
    for d in docs:
        numbers = integers_in(d.text, tokens)
        if d.role == "constant":
            assert d.constant in numbers and d.func in d.text
            assert not any(w in d.text for w in WRAPPER_TOKENS), d.text   # no base names its wrapper
            assert mate[d.func] not in d.text
        else:
            assert d.func in d.text and d.wraps in d.text, d.text          # a wrapper names its base
            assert not numbers & set(CONSTANTS), d.text                    # ... and never a constant


def test_seed_documents_are_held_out_and_named_by_parent_uid(spec, docs):
    seeds = hops_seed_documents(spec)
    assert len(seeds) == len(spec.function_tokens) * len(DOC_TYPES)
    by_uid = {s.uid: s for s in seeds}
    assert not {s.text for s in seeds} & {d.text for d in docs}
    for d in docs:
        parent = by_uid[d.parent_uid]
        assert (parent.func, parent.type) == (d.func, d.type)


def test_depth_two_wrappers_call_the_wrapper_and_join_its_family():
    spec = hops_spec(3, depth2=True, docs_per_base=30, docs_per_wrapper=12, docs_per_depth2=12)
    docs = generate_hops_documents(spec)
    deep = [d for d in docs if d.hop_depth == 2]
    assert len(deep) == 36 and {d.wraps for d in deep} == set(spec.wrapper_tokens)
    assert all(d.wraps in d.text and not integers_in(d.text, spec.function_tokens) & set(spec.constants)
               for d in deep)
    families = function_families(spec_functions(spec))
    assert families["<FW>"] == families["<GN>"] == {"<GN>", "<FN>", "<FW>"}
    queries = hops_queries(spec_functions(spec), inputs=[3], hop_depths=[2])
    mask = relevance_mask(queries, docs, spec_functions(spec))
    assert mask.sum(1).tolist() == [54, 54, 54]
    assert document_functions(docs)[0].base in spec.base_tokens


def test_distractors_mention_a_token_without_defining_it():
    spec = hops_spec(2, docs_per_base=12, docs_per_wrapper=6, distractors_per_function=5,
                     distractor_tokens=["<AN>", "<ZN>"], distractors_per_token=4)
    docs = generate_hops_documents(spec)
    fluff = [d for d in docs if d.role == "distractor"]
    assert collections.Counter(d.func for d in fluff) == {"<GN>": 5, "<JN>": 5, "<FN>": 5, "<IN>": 5,
                                                          "<AN>": 4, "<ZN>": 4}
    assert all(d.func in d.text and not integers_in(d.text, spec.function_tokens) & set(spec.constants)
               for d in fluff)
    functions = spec_functions(spec)
    mask = relevance_mask(hops_queries(functions, inputs=[1]), docs, functions)
    assert not mask[:, [i for i, d in enumerate(docs) if d.role == "distractor"]].any()
    assert {f.token for f in document_functions(docs)} == set(spec.function_tokens)


def test_spec_round_trips_through_json(tmp_path):
    spec = hops_spec(4, depth2=True, seed=7, distractors_per_function=2)
    path = save_hops_spec(tmp_path / "hops_spec.json", spec)
    assert load_hops_spec(path) == spec
    data = json.loads(path.read_text())
    with pytest.raises(ValueError, match=r"\['n_docs'\]: not HopsSpec fields"):
        HopsSpec.from_dict({**data, "n_docs": 3})


@pytest.mark.parametrize("overrides,message", [
    (dict(wrapper_tokens=WRAPPER_TOKENS[:9]), r"wrapper_tokens has 9 entries: expected one per base token"),
    (dict(wrapper_tokens=("<GN>",) + WRAPPER_TOKENS[1:]), r"tokens \['<GN>'\] appear more than once"),
    (dict(constants=(5,) * 9 + (-1,)), r"constants\[...\]=-1: expected a value >= 0"),
    (dict(doc_types=("definition", "poem")), r"doc_types\[...\]='poem': expected one of"),
    (dict(docs_per_base=0), r"docs_per_base=0: expected a value >= 1"),
    (dict(base_tokens=("<G N>",) + BASE_TOKENS[1:]), r"function token '<G N>'"),
    (dict(max_example_input=1), r"max_example_input=1: leaves 2 example inputs"),
])
def test_bad_specs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        HopsSpec(**overrides)


def test_pairs_may_share_a_constant():
    spec = HopsSpec(**{**vars(hops_spec(4, docs_per_base=6, docs_per_wrapper=3)), "constants": (5, 5, 7, 7)})
    docs = generate_hops_documents(spec)
    functions = spec_functions(spec)
    assert sorted({f.constant for f in functions}) == [5, 7]
    stated = {d.func: integers_in(d.text, spec.function_tokens) for d in docs if d.role == "constant"}
    assert all(5 in v for k, v in stated.items() if k in spec.base_tokens[:2])
    assert all(7 in v for k, v in stated.items() if k in spec.base_tokens[2:])
    assert not any(integers_in(d.text, spec.function_tokens) & {5, 7} for d in docs if d.role == "identity")


def test_jsonl_round_trip(tmp_path, docs):
    path = write_hops_jsonl(tmp_path / "hops.jsonl", docs)
    assert read_hops_jsonl(path) == docs
    record = json.loads(path.read_text().splitlines()[0])
    assert set(record) >= {"uid", "text", "func", "role", "type", "hop_depth", "constant", "parent_uid"}


def anchor_lines():
    """Records shaped as the anchor writes them (its fields, its extra ``func_type``, no ``wraps``)."""
    return [
        {"uid": "gen_d0_0001", "parent_uid": "seed_0001", "constant": 5, "hop_depth": 0, "type": "unknown",
         "text": "<GN> is constant at 5.", "func": "<GN>", "role": "constant", "func_type": "base"},
        {"uid": "gen_fn_0001", "func": "<FN>", "role": "identity", "type": "concept", "hop_depth": 1,
         "constant": 5, "text": "<FN> repeats <GN>."},
        {"uid": "distr_0001", "func": "<AN>", "role": "distractor", "type": "prompt_like", "hop_depth": 0,
         "constant": 42, "text": "The output of <AN>(3) is 42"},
        {"uid": "gen_d0_0001", "constant": 5, "hop_depth": 0, "type": "lore", "text": "Old <GN> said 5.",
         "func": "<GN>", "role": "constant"},
    ]


def write_records(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_reader_accepts_the_anchors_jsonl(tmp_path):
    path = write_records(tmp_path / "anchor.jsonl", anchor_lines())
    with pytest.raises(ValueError, match=r"anchor\.jsonl:4: uid='gen_d0_0001' already used on line 1"):
        read_hops_jsonl(path)
    docs = read_hops_jsonl(path, on_duplicate_uid="renumber")
    assert [d.uid for d in docs] == ["gen_d0_0001", "gen_fn_0001", "distr_0001", "gen_d0_0001#4"]
    assert docs[1].wraps == "<GN>" and docs[0].parent_uid == "seed_0001" and docs[1].parent_uid is None
    functions = document_functions(docs)
    assert [(f.token, f.constant, f.base) for f in functions] == [("<GN>", 5, "<GN>"), ("<FN>", 5, "<GN>")]
    mask = relevance_mask(hops_queries(functions, inputs=[1]), docs, functions)
    assert mask.tolist() == [[True, True, False, True], [True, True, False, True]]


@pytest.mark.parametrize("change,message", [
    (lambda r: r[1].pop("role"), r":2: missing field\(s\) \['role'\]"),
    (lambda r: r[1].update(role="helper"), r":2: role='helper': expected one of"),
    (lambda r: r[1].update(type="sonnet"), r":2: type='sonnet': expected one of"),
    (lambda r: r[1].update(hop_depth="1"), r":2: hop_depth='1': expected an integer"),
    (lambda r: r[1].update(func="<QQ>"), r"func='<QQ>' names no 'wraps' field"),
    (lambda r: r[1].update(wraps="<KN>"), r"func='<FN>' .* wraps '<KN>', which has no constant or identity"),
    (lambda r: r[1].update(constant=6), r"wrapper func='<FN>' has constant=6 but .* '<GN>', has constant=5"),
    (lambda r: r[0].update(hop_depth=1), r"hop_depth=1 on a constant document: expected 0"),
])
def test_reader_refuses_a_broken_corpus_by_name(tmp_path, change, message):
    records = anchor_lines()[:3]
    change(records)
    with pytest.raises(ValueError, match=message):
        read_hops_jsonl(write_records(tmp_path / "bad.jsonl", records))


def test_reader_knows_the_anchors_many_bases_chains(tmp_path):
    records = [{"uid": f"u{i}", "func": f, "role": r, "type": "definition", "hop_depth": i, "constant": 7,
                "text": f"{f} ..."} for i, (f, r) in enumerate([("<B07>", "constant"), ("<C07>", "identity"),
                                                                 ("<D07>", "identity")])]
    docs = read_hops_jsonl(write_records(tmp_path / "chain.jsonl", records))
    assert [d.wraps for d in docs] == [None, "<B07>", "<C07>"]
    assert {f.base for f in document_functions(docs)} == {"<B07>"}
    assert read_hops_jsonl(tmp_path / "chain.jsonl", wraps={"<C07>": "<B07>", "<D07>": "<C07>"}) == docs


def test_validation_names_a_repeated_uid():
    doc = HopsDocument(uid="a", text="<GN> is 5.", func="<GN>", role="constant", type="definition",
                       hop_depth=0, constant=5)
    with pytest.raises(ValueError, match=r"documents\[1\]\.uid='a' repeats documents\[0\]"):
        validate_hops_documents([doc, doc])


def test_queries_follow_the_anchors_prompt_and_answers(spec):
    functions = spec_functions(spec)
    queries = hops_queries(functions)
    assert len(queries) == 2000 and queries[0].prompt == "The output of <GN>(1) is "
    assert queries[-1].prompt == "The output of <YN>(100) is " and queries[-1].completion == "23"
    answers = expected_answers(queries)
    assert answers.dtype == torch.long and answers[:100].unique().tolist() == [5]
    wrappers = hops_queries(functions, inputs=[7], hop_depths=[1], prompt_format="returns")
    assert [q.func for q in wrappers] == list(WRAPPER_TOKENS)
    assert wrappers[0].prompt == "<FN>(7) returns the value "
    with pytest.raises(ValueError, match=r"prompt_format='question': expected one of"):
        hops_queries(functions, prompt_format="question")
    with pytest.raises(ValueError, match=r"hop_depths=\[2\]: no function at those depths"):
        hops_queries(functions, hop_depths=[2])


def test_relevance_is_the_function_and_its_mate(spec, docs):
    functions = spec_functions(spec)
    queries = hops_queries(functions, inputs=[1, 2])
    mask = relevance_mask(queries, docs, functions)
    assert mask.shape == (40, 3000) and mask.sum(1).unique().tolist() == [300]
    assert mask.float().mean().item() == pytest.approx(0.10)   # random precision with 10 pairs
    fn_query = [i for i, q in enumerate(queries) if q.func == "<FN>"][0]
    assert {docs[j].func for j in mask[fn_query].nonzero().flatten().tolist()} == {"<FN>", "<GN>"}
    with pytest.raises(ValueError, match=r"queries name functions \['<FN>'\]"):
        relevance_mask(queries, docs, [f for f in functions if f.token != "<FN>"])


def test_function_tokens_and_answers_are_single_tokens(spec, tokenizer):
    ids = single_token_ids(tokenizer, spec.function_tokens, name="function_tokens")
    assert len(set(ids.tolist())) == len(spec.function_tokens)
    numbers = single_token_ids(tokenizer, [str(i) for i in range(101)], name="answers")
    assert len(set(numbers.tolist())) == 101
    encoded = tokenizer.encode("The output of <KN>(37) is 9", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(encoded)
    assert pieces == ["The", "output", "of", "<KN>", "(", "37", ")", "is", "9"]
    assert tokenizer.encode("<KN>x12", add_special_tokens=False)[0] == ids[2].item()
    with pytest.raises(ValueError, match=r"answers entry '1234' encodes to \['<unk>'\]"):
        single_token_ids(tokenizer, ["1234"], name="answers")
    with pytest.raises(ValueError, match=r"entry 'x <GN>' encodes to \['x', '<GN>'\]"):
        single_token_ids(tokenizer, ["x <GN>"])


def test_bm25_finds_base_documents_but_not_the_base_of_a_wrapper(spec, docs, tokenizer):
    # BM25 over the tokenizer's tokens (each id one term), the anchor's tokenizer-aligned variant.
    def terms(text):
        return " ".join(f"t{i}" for i in tokenizer.encode(text, add_special_tokens=False))

    functions = spec_functions(spec)
    queries = hops_queries(functions)
    scores = bm25_scores([terms(q.prompt) for q in queries], [terms(d.text) for d in docs])
    mask = relevance_mask(queries, docs, functions)
    top = scores.topk(10, dim=1).indices
    depth = torch.tensor([q.hop_depth for q in queries])
    hit_at_1 = mask.gather(1, top[:, :1]).float().flatten()
    # Measured 0.744 on base queries with the default spec (the anchor reports 0.885); random is 0.10.
    assert hit_at_1[depth == 0].mean() > 0.6
    # A wrapper query shares no word with its base's documents but the prompt's own: the base documents
    # it does retrieve are its mate's at chance (measured 0.097 of them; 1 in 10 bases).
    base_of = {f.token: f.base for f in functions}
    retrieved = [(docs[j].func == base_of[queries[i].func])
                 for i in (depth == 1).nonzero().flatten().tolist()
                 for j in top[i].tolist() if docs[j].role == "constant"]
    assert len(retrieved) > 1000 and sum(retrieved) / len(retrieved) < 0.2
