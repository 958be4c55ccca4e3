"""Fine-tuning and evaluation: data, losses, metrics, and the training loop.

``config`` (typed defaults + recipes + overrides), ``losses`` / ``pointmap_loss``, ``metrics`` /
``pose_metrics``, ``datasets`` / ``seg_dataset`` / ``pose_dataset`` with ``augment``,
``pipelines``, ``pose_augment``, ``photometric``, ``heatmaps``, and ``optim`` / ``sampler``;
the loop: ``loop`` (generic ``Trainer``), ``checkpoint``, ``parallel`` (DDP / FSDP2),
``run_log`` (metrics.jsonl, progress), ``evaluation`` (validation with the released metrics),
``model_setup`` (model and initial weights from the config) and ``finetune`` (the command).
Importing this package imports nothing else.
"""
