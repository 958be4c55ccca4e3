"""Sapiens2 pretraining: masked reconstruction plus self-distilled contrastive learning.

``config`` (typed defaults and recipes), ``masking``, ``heads`` (MAE decoder, DINO head),
``losses``, ``schedules``, ``model`` (student + EMA teacher, one ``step`` per batch),
``sources`` (lazy folder / tar-shard walks), ``data`` (resumable sharded streams),
``augment`` (multi-crop views) and ``run`` (a minimal single-process driver).
"""
