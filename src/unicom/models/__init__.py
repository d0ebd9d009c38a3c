"""Models: the registry, the architectures, the model folder, loading and the Hub.

* :mod:`~unicom.models.registry`: every architecture and named model as data (builders,
  settings, preprocessing, released weights); ``register_model``/``register_architecture``;
* :mod:`~unicom.models.vit` (CLIP-shaped ViTs built with timm, and ``create_model``, the
  factory of trainable models), :mod:`~unicom.models.unicom_vit` (the released checkpoints'
  architecture): one file per family;
* :mod:`~unicom.models.export`: the model folder, the one format every stage hands a
  model over in (with timm's config where timm can build the network);
* :mod:`~unicom.models.weights`: reading checkpoint files safely, loading them strictly;
* :mod:`~unicom.models.hub`: release downloads (SHA-256, cache, mirrors, offline) and the
  Hugging Face Hub;
* :mod:`~unicom.models.factory`: ``unicom.load`` (names, folders, files, ``hf-hub:``);
  :mod:`~unicom.models.convert`: released checkpoints <-> model folders;
* :mod:`~unicom.models.encoders`: the :class:`~unicom.models.encoders.Encoder` interface
  every stage embeds with, and ``load_encoder``; :mod:`~unicom.models.foundation`: open_clip
  and timm models as encoders.
"""
