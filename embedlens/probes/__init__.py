"""Probes over visual tokens, found through `embedlens.registry.probes`.

The public names load on first use, so that a look-up of one probe (``embedlens validate``) imports that probe's
module alone; the registry imports every module of `BUILTINS` when it lists the probes.
"""

from __future__ import annotations

from embedlens._lazy import lazy_names


#: Every module that registers a built-in probe (imported when the probe registry lists its plugins).
BUILTINS = (
    "embedlens.probes.anchor_discovery",
    "embedlens.probes.attention_flow",
    "embedlens.probes.contextual_lens",
    "embedlens.probes.dead_token_entropy",
    "embedlens.probes.embedding_lens",
    "embedlens.probes.layer_alignment",
    "embedlens.probes.logit_lens",
    "embedlens.probes.partition",
    "embedlens.probes.semantic_probe",
    "embedlens.probes.sink_detector",
    "embedlens.probes.temporal_sinks",
    "embedlens.probes.token_clusters",
)

# Public name -> module.
_LAZY = {
    "AnchorDiscovery": "embedlens.probes.anchor_discovery",
    "AnchorGroups": "embedlens.probes.partition",
    "AttentionFlow": "embedlens.probes.attention_flow",
    "ContextualLens": "embedlens.probes.contextual_lens",
    "DeadTokenEntropy": "embedlens.probes.dead_token_entropy",
    "EmbeddingLens": "embedlens.probes.embedding_lens",
    "LayerAlignment": "embedlens.probes.layer_alignment",
    "LogitLens": "embedlens.probes.logit_lens",
    "Probe": "embedlens.probes.base",
    "SemanticProbe": "embedlens.probes.semantic_probe",
    "SinkDetector": "embedlens.probes.sink_detector",
    "Table": "embedlens.probes.base",
    "TemporalSinks": "embedlens.probes.temporal_sinks",
    "TokenClusters": "embedlens.probes.token_clusters",
    "TokenPartition": "embedlens.probes.partition",
    "TunedLens": "embedlens.probes.logit_lens",
    "nearest_vocab": "embedlens.vocab",
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = [
    "AnchorDiscovery",
    "AnchorGroups",
    "AttentionFlow",
    "ContextualLens",
    "DeadTokenEntropy",
    "EmbeddingLens",
    "LayerAlignment",
    "LogitLens",
    "Probe",
    "SemanticProbe",
    "SinkDetector",
    "Table",
    "TemporalSinks",
    "TokenClusters",
    "TokenPartition",
    "TunedLens",
    "nearest_vocab",
]
