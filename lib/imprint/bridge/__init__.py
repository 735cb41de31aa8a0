"""The gradient bridge (chapter 06): closed-form lifts from a LoRA update to the full-weight gradient it
was taken from (:mod:`imprint.bridge.decoders`), per-example full gradients and one-step LoRA-update
pairs of a small model (:mod:`imprint.bridge.per_example`), and the Inverting Gradients attack that turns
a full gradient back into images (:mod:`imprint.bridge.inversion`); the attacked CNN and its pretraining
(:mod:`imprint.bridge.targets`), resumable sharded proxy pairs with one- and T-step updates
(:mod:`imprint.bridge.pairs`), and a learned per-layer decoder scored against the lifts
(:mod:`imprint.bridge.learned`)."""
