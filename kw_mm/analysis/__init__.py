"""Analysis tools for KW models: attention maps (paper Figure 3), FLOPs and parameters."""
from .attention_maps import (
                             AttentionCollector,
                             NoKWLayersError,
                             WarehouseAttention,
                             attention_arrays,
                             collect_attention_maps,
                             figure_size,
                             find_kw_layers,
                             render_attention_maps,
                             save_attention_arrays,
)
from .complexity import Complexity, counting_forward, model_complexity, plain_counterpart

__all__ = [
    'AttentionCollector', 'NoKWLayersError', 'WarehouseAttention', 'attention_arrays',
    'collect_attention_maps', 'figure_size', 'find_kw_layers', 'render_attention_maps',
    'save_attention_arrays', 'Complexity', 'counting_forward', 'model_complexity',
    'plain_counterpart'
]
