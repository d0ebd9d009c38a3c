"""Search over an embedding collection: a faiss index (:mod:`unicom.search.index`) and an
HTTP service with a web page (:mod:`unicom.search.service`, needs ``unicom[serve]``).

``unicom.Index`` is :class:`unicom.search.index.Index`.
"""
