"""Scoring, never dependent on training code.

``answers`` (DPR's ``has_answer``), ``topk`` (top-k accuracy), ``qrels`` (trec_eval metrics), ``qa``
(exact match, F1), ``tuning`` (the hybrid's lambda on dev questions), ``report`` (tables and plots).
Reads ranked lists and QA sets; writes results JSON, Markdown tables and PNG plots.
"""
