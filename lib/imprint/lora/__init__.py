"""LoRA adapters and what they reveal (chapter 05): peft models of the bias-free MLP and a batched adapter
trainer (:mod:`imprint.lora.adapters`), the coupled stationarity conditions and the reconstruction losses
that invert them (:mod:`imprint.lora.kkt`), and one cell of the chapter's experiment
(:mod:`imprint.lora.experiment`)."""
