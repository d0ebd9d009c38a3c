"""The training program (``unicom train``), imported only by the command and by users who
train: ``import unicom`` and ``import unicom.losses`` never import it. It is built from the
training core, :mod:`unicom.engine` (the step, the recipe engine, checkpoints, logging).

* :func:`unicom.train.trainer.train` runs a recipe;
* :mod:`unicom.train.config` defines the recipe's sections and checks them;
* :mod:`unicom.train.data` turns shards + pseudo-labels, or labelled lists, into batches.
"""
