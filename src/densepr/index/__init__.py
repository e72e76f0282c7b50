"""Passage vectors and the FAISS index over them.

``embeddings`` (encode a corpus into ``part-NNNNN.npy`` shards, resumable), ``dense``
(:class:`DenseIndex`: every FAISS index type, build, save, load, search, shards, GPU path). Reads a
corpus + a passage encoder; writes ``embeddings/`` and ``dense/``.
"""
