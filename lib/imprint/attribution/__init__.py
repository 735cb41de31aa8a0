"""Attribution between checkpoints on the HOPS nested-function benchmark (chapter 07): the models of the
chapter, with the HOPS function tokens added to a pretrained LM or a tiny from-scratch Llama and the
fine-tuning that turns f_old into f_new (:mod:`imprint.attribution.models`); the logit evaluation that
scores the single-token integer answers of the prompts ``"The output of <F>(x) is "`` and picks the
queries a model answers correctly (:mod:`imprint.attribution.evaluation`); and forward hooks, registered
in a context manager that always removes them, that capture per-layer hidden states at chosen token
positions (:mod:`imprint.attribution.hooks`). The ranking metrics of a score matrix against the relevant
documents, with bootstrap intervals over queries and a paired test between methods, are in
:mod:`imprint.attribution.metrics`. The baselines every method is compared with (random, BM25 and edit
distance over the model's tokens, sentence embeddings, hidden-state and projected-gradient cosines,
EK-FAC influence through kronfluence) are in :mod:`imprint.attribution.baselines`."""
