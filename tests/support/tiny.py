"""Small data every test can make: a dozen passages, a few questions, and a random tiny BERT."""

from __future__ import annotations

import contextlib
import json
import string
from collections.abc import Iterator
from pathlib import Path

PASSAGES = [
    ("Wilhelm Röntgen", "Wilhelm Conrad Röntgen was a German physicist who received the first Nobel Prize in Physics in 1901 for discovering X-rays."),
    ("Aaron", "Aaron is a prophet, high priest, and the elder brother of Moses in the Abrahamic religions."),
    ("Great Lakes", "The Great Lakes connect to the Atlantic Ocean through the Saint Lawrence River in North America."),
    ("Prime number", "A prime number is a natural number greater than 1; the smallest prime greater than 30 is 31."),
    ("Helicopter", "A helicopter is a type of rotorcraft; the Sikorsky VS-300 was an early American helicopter."),
    ("Mount McKinley", "Denali, formerly Mount McKinley, is 20,310 feet tall and the highest peak in North America."),
    ("Kangaroo", "The kangaroo is a marsupial from Australia that moves by hopping on its strong hind legs."),
    ("Python", "Python is a programming language created by Guido van Rossum and first released in 1991."),
    ("Moon landing", "Apollo 11 landed the first humans on the Moon on July 20, 1969: Neil Armstrong and Buzz Aldrin."),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair."),
    ("Photosynthesis", "Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Mozart", "Wolfgang Amadeus Mozart was a prolific composer of the Classical period, born in Salzburg in 1756."),
]  # fmt: skip

QUESTIONS = [
    ("who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"]),
    ("where do the great lakes meet the ocean", ["the Saint Lawrence River"]),
    ("what is the smallest prime number that is greater than 30", ["31"]),
    ("when did apollo 11 land on the moon", ["July 20, 1969"]),
    ("who created python", ["Guido van Rossum"]),
    ("what is the capital of mars", ["Olympus City"]),
]


def _vocab() -> list[str]:
    words = {w.lower().strip(string.punctuation) for _, x in PASSAGES for w in (x + " " + _).split()}
    words |= {w for q, _ in QUESTIONS for w in q.split()}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return specials + sorted(w for w in words if w) + [c for c in chars] + ["##" + c for c in string.ascii_lowercase + string.digits]


def make_tiny_bert(
    path: Path, seed: int = 0, hidden: int = 32, pooling: str | None = None, normalize: bool = False, dropout: float = 0.1
) -> Path:
    """Write a random 2-layer BERT with a real WordPiece tokenizer (safetensors) to ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores vocab_file= here; the vocabulary must be passed as a dict.
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(_vocab()))}, do_lower_case=True)
    assert len(tok) > 100
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)  # fmt: skip
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    if pooling:
        (path / "densepr_encoder.json").write_text(json.dumps({"pooling": pooling, "normalize": normalize, "max_length": 128}))
    return path


@contextlib.contextmanager
def counting_encodes(encoder) -> Iterator[list[int]]:
    """Yield a list that records how many passages each ``encoder.encode_passages`` call encodes."""
    calls: list[int] = []
    original = encoder.encode_passages
    encoder.encode_passages = lambda *a, **k: calls.append(len(a[0])) or original(*a, **k)
    try:
        yield calls
    finally:
        del encoder.encode_passages


def make_tiny_mpnet(path: Path, seed: int = 0, hidden: int = 32, dropout: float = 0.0, max_positions: int = 130) -> Path:
    """Write a random 2-layer MPNet (no token_type_ids) with an MPNet WordPiece tokenizer and
    sentence-transformers' files as all-mpnet-base-v2 has them (mean pooling, then Normalize)."""
    import torch
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]  # MPNet's ids: <s> 0, <pad> 1, </s> 2
    words = [w for w in dict.fromkeys(_vocab()) if not (w.startswith("[") and w.endswith("]"))]
    tok = MPNetTokenizerFast(vocab={w: i for i, w in enumerate(specials + words)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                      max_position_embeddings=max_positions, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip
    MPNetModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
                                                                "pooling_mode_mean_tokens": True}))  # fmt: skip
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))  # fmt: skip
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return path
