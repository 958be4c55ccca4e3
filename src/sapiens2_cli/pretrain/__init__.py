"""Sapiens2 pretraining: masked reconstruction plus self-distilled contrastive learning.

``config`` (the ``augment`` / ``loss`` sections of ``task: pretrain`` in the shared config
system), ``masking``, ``heads`` (MAE decoder, DINO head), ``losses``, ``schedules``, ``model``
(student + EMA teacher, one ``step`` per batch), ``sources`` (lazy folder / tar-shard walks),
``data`` (resumable sharded streams), ``augment`` (multi-crop views) and ``run`` (``sapiens2
pretrain`` on the shared training loop).
"""
