"""Retrieval: question in, ranked passages out.

``bm25`` (Lucene-exact BM25 over bm25s, memory-mapped), ``fusion`` (DPR's hybrid, RRF), ``modes``
(the one list of retrieval modes), ``index_dir`` (:class:`IndexDir`: the index directory's layout),
``retriever`` (:class:`Retriever`: loads an index directory and runs any mode). Reads ``passages.tsv``, ``bm25/``, ``dense/``, ``hybrid.json``; writes ``bm25/``.
"""
