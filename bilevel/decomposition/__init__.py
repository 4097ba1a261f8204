"""The decomposition: term cotangents and the record of a split, ablation, terms zero by construction."""
