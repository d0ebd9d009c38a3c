"""The training program (``unicom train``), imported only by the command and by users who
train: ``import unicom`` and ``import unicom.losses`` never import it.

* :func:`unicom.train.trainer.train` runs a recipe;
* :mod:`unicom.train.config` reads, overrides and validates recipes;
* :mod:`unicom.train.data` turns shards + pseudo-labels, or labelled lists, into batches;
* :mod:`unicom.train.checkpoint` writes, verifies, reads and exports checkpoints.
"""
