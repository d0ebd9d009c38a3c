"""Search over an embedding collection, one job per module:

* :mod:`unicom.search.collection`: an embedding folder's image embeddings as rows with ids;
* :mod:`unicom.search.planner`: which index fits a memory budget, and the search
  parameter that reaches a recall target (memory formulas, candidates, tuning);
* :mod:`unicom.search.index`: the faiss index folder: build, load, search, add, save;
* :mod:`unicom.search.metadata_rows`: its metadata files, local or at a URL, read a row
  group at a time through a bounded cache;
* :mod:`unicom.search.service`: the HTTP service with a web page (needs ``unicom[serve]``).

``unicom.Index`` is :class:`unicom.search.index.Index`.
"""
