"""The folder formats that stages hand each other, one owner module per format.

* :mod:`unicom.formats.embeddings`: the embedding folder (``img_emb/``, ``text_emb/``,
  ``metadata/``; clip-retrieval's layout) that ``unicom embed`` writes and ``cluster``,
  ``index``, ``evaluate`` and the UniFEx feature cache read.
* :mod:`unicom.formats.clusters`: the clustering output folder (centroids, records and
  ``labels/labels_{i}.parquet``) that ``unicom cluster`` writes and ``unicom train`` reads.

Each owner writes its format, validates it, and is the only module that reads it for
others, so "a complete part" or "a label file" means one thing everywhere. Owners are
light to import: numpy and the standard library (pyarrow on first use), never torch or
faiss, and they import no stage.
"""
