//! GPS: gradient accumulation, per-neuron selection, sparse deltas, the artifact, merge.
