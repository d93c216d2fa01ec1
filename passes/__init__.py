"""moeify's graph passes (installed as `moeify.passes`). One pass per module:

- `find_ffn_regions`: dense FFN regions of a traced graph (analysis)
- `find_lstm_projection`: rule for the Linear between stacked LSTMs (an MoE of projections)
- `find_split_ffn`: FFNs split across sibling modules (BERT), on a trace of the parent's helper method
- `plan_regions`: which regions the config selects
- `rewrite_to_moe`: each region -> router / dispatch / experts / combine subgraph
- `insert_aux_loss`: aux-loss recording after each router
- `verify_graph`: the rewritten graph's contract
"""
