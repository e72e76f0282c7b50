"""Data formats and loaders: passages, QA sets, DPR training JSON, BEIR, and the embedded benchmark."""

from densepr.data.beir import BeirDataset, load_beir, read_qrels_tsv, read_queries
from densepr.data.fetch import EmbeddedData, FetchError, default_cache_dir, fetch_embedded
from densepr.data.passages import (
    Corpus,
    Passage,
    iter_passages_jsonl,
    iter_passages_tsv,
    load_corpus,
    split_article,
    split_articles,
    write_passages_tsv,
)
from densepr.data.qa import QA, QASet, load_qa, write_qa_tsv
from densepr.data.store import StoreCorpus, build_store, open_store
from densepr.data.summaries import load_wiki_summaries
from densepr.data.training import TrainRecord, iter_train_records, write_train_records

__all__ = [
    "QA", "BeirDataset", "Corpus", "EmbeddedData", "FetchError", "Passage", "QASet", "StoreCorpus", "TrainRecord",
    "build_store", "default_cache_dir", "fetch_embedded", "iter_passages_jsonl", "iter_passages_tsv", "iter_train_records",
    "load_beir", "load_corpus", "open_store", "read_qrels_tsv", "read_queries", "load_qa", "load_wiki_summaries", "split_article", "split_articles",
    "write_passages_tsv", "write_qa_tsv", "write_train_records",
]  # fmt: skip
