"""Training: the DPR retriever and the reader.

``config`` (every setting and default), ``mining`` (positives and hard negatives from BM25),
``gradcache`` (one step: NLL over the batch, gradient caching), ``distributed`` (torchrun's global
batch), ``optim`` (AdamW, schedule, step), ``checkpoint`` (save, resume, best: one module for both
trainers), ``retriever`` and ``reader`` (the loops). Reads training JSON / DPR result JSON; writes run
directories (``config.json``, ``metrics.jsonl``, ``checkpoint/``, ``best/``).
"""
