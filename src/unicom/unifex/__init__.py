"""UniFEx: universal embeddings from a frozen foundation model and a small trained head.

* :mod:`~unicom.unifex.model`: the frozen backbone, the neck (linear projection with
  optional BatchNorm and dropout, or pooling), the exported ``unifex`` architecture;
* :mod:`~unicom.unifex.data`: multi-domain lists of (dataset, path, class) rows with
  disjoint class ids, instance and class-balanced sampling, per-dataset summaries;
* :mod:`~unicom.unifex.cache`: the feature cache in the ``unicom embed`` layout;
* :mod:`~unicom.unifex.trainer`: cache-mode and direct-mode training, evaluation
  (mMP@5, Recall@K) and export (``probe``, the ``unicom probe`` command);
* :mod:`~unicom.unifex.config`: the recipe sections.

The margin heads and the prototypes are :mod:`unicom.losses`' (one implementation).
"""
