"""Fine-tuning and evaluation building blocks, independent of the model code.

``config`` (typed defaults + recipes + overrides), ``losses`` / ``pointmap_loss``, ``metrics`` /
``pose_metrics``, ``datasets`` / ``seg_dataset`` / ``pose_dataset`` with ``augment``,
``pipelines``, ``pose_augment``, ``photometric``, ``heatmaps``, and ``optim`` / ``sampler``.
Importing this package imports nothing else.
"""
