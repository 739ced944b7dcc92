"""Analysis tools for trained KW models (attention maps of paper Figure 3)."""
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

__all__ = [
    'AttentionCollector', 'NoKWLayersError', 'WarehouseAttention', 'attention_arrays',
    'collect_attention_maps', 'figure_size', 'find_kw_layers', 'render_attention_maps',
    'save_attention_arrays'
]
