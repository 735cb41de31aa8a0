"""Chapter 08: safety interventions on a causal LM. :mod:`imprint.safety.circuit_breakers` holds
representation rerouting (circuit breakers, Zou et al. 2024): its options, the LoRA wrapper whose frozen
model is the adapter switched off, the retain and circuit-breaker losses with their coefficient schedule,
one training step, and the checks of the conversation records it trains on."""

from imprint.safety.circuit_breakers import (CircuitBreakerConfig, CircuitBreakerModel, ReroutingLoss,
                                             check_batch, check_records, circuit_breaker_loss, coefficients,
                                             decoder_layers, masked_cosine, rerouting_step, retain_loss,
                                             truncated_layers)

__all__ = ["CircuitBreakerConfig", "CircuitBreakerModel", "ReroutingLoss", "check_batch", "check_records",
           "circuit_breaker_loss", "coefficients", "decoder_layers", "masked_cosine", "rerouting_step",
           "retain_loss", "truncated_layers"]
