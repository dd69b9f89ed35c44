"""Probes over visual tokens, found through `embedlens.registry.probes`.

Importing this package registers every built-in probe.
"""

from embedlens.probes.anchor_discovery import AnchorDiscovery
from embedlens.probes.attention_flow import AttentionFlow
from embedlens.probes.base import Probe, Table
from embedlens.probes.contextual_lens import ContextualLens
from embedlens.probes.dead_token_entropy import DeadTokenEntropy
from embedlens.probes.embedding_lens import EmbeddingLens
from embedlens.vocab import nearest_vocab
from embedlens.probes.layer_alignment import LayerAlignment
from embedlens.probes.logit_lens import LogitLens, TunedLens
from embedlens.probes.partition import AnchorGroups, TokenPartition
from embedlens.probes.semantic_probe import SemanticProbe
from embedlens.probes.sink_detector import SinkDetector
from embedlens.probes.temporal_sinks import TemporalSinks
from embedlens.probes.token_clusters import TokenClusters

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
