"""The layer n -> n+1 feature graph: exact batched ablation, attribution, networkx, exports."""
from .build import build_graph, neighbourhood, node_id
from .export import export_graph, read_dot
from .measure import PairEffects, measure_pair

__all__ = ["PairEffects", "build_graph", "export_graph", "measure_pair", "neighbourhood", "node_id", "read_dot"]
