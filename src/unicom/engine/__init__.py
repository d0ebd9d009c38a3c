"""The training core: what every program that trains with prototypes shares.

A library room, like :mod:`unicom.losses` and :mod:`unicom.models`: it imports no program
(``unicom.train``, ``unicom.unifex``, ``unicom.commands``), and the programs are built
from it.

* :mod:`~unicom.engine.recipe`: the recipe engine (typed dataclass sections, strict keys,
  YAML overrides, defaults, every problem reported at once);
* :mod:`~unicom.engine.sections`: the shared recipe sections ``augment``, ``loss``,
  ``optim``, ``schedule``, defined and checked once;
* :mod:`~unicom.engine.step`: one optimiser step (micro-steps, loss scaling, clipping, the
  non-finite check) and the optimisers;
* :mod:`~unicom.engine.graph`: a step captured once as a CUDA graph and replayed (one
  launch per step, for steps of a head alone);
* :mod:`~unicom.engine.device`: device and precision choice, autocast;
* :mod:`~unicom.engine.schedule`: learning-rate schedules as functions of the step;
* :mod:`~unicom.engine.runlog`: the run log (console, ``log.jsonl``, TensorBoard);
* :mod:`~unicom.engine.ddp`: DistributedDataParallel with summed gradients;
* :mod:`~unicom.engine.seeding`: seeds and generator states;
* :mod:`~unicom.engine.checkpoint`: the training checkpoint format (atomic, verified,
  independent of the number of ranks), its reading and its export as a model folder.

Importing this package imports nothing; ``recipe`` and ``sections`` do not import torch.
"""
