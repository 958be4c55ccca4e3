"""Per-task pre/post-processing, heads and outputs (one module per task or concept)."""
