"""One question answered through every front end: `densepr answer`, `densepr serve`'s /answer, and
`densepr serve --ray`'s /answer (tests/serve)."""

from __future__ import annotations

import json

import httpx
from fastapi.testclient import TestClient

from densepr.models.reader import Reader
from densepr.retrieve.retriever import Retriever
from densepr.serve.app import create_app
from densepr.serve.service import Service
from tests.support.cli import run

# DPR's passage rule, with a tuned k per mode (what `densepr tune-reader` stores) that differs from top_k
TUNED_K = {"hybrid": {"relevance": 1.0, "span": 0.0, "retriever": 0.0, "aggregate": 0.0, "k": 2},
           "bm25": {"relevance": 1.0, "span": 0.0, "retriever": 0.0, "aggregate": 0.0, "k": 4}}  # fmt: skip
ANSWER_Q = "who created python"


def answer_everywhere(capsys, index, reader, mode: str | None, ray_url: str | None = None) -> dict[str, tuple]:
    """One question answered with no k through `densepr answer`, `POST /answer` of `densepr serve` and
    (``ray_url``) `densepr serve --ray`: each front end's (mode, k, answer, passages read)."""
    code, out, err = run(capsys, "answer", ANSWER_Q, "--index", str(index), "--reader", str(reader), "--json", "--device", "cpu",
                         *(["--mode", mode] if mode else []))  # fmt: skip
    assert code == 0, err
    a = json.loads(out)
    got = {"cli": (a["mode"], a["k"], a["text"], [p["id"] for p in a["passages"]])}
    body = {"question": ANSWER_Q, **({"mode": mode} if mode else {})}
    http = TestClient(create_app(Service(Retriever.load(index, device="cpu"), Reader.load(reader, "cpu"))))
    answers = {"http": http.post("/answer", json=body).json()}
    if ray_url is not None:
        answers["ray"] = httpx.post(ray_url + "/answer", json=body, timeout=60).json()
    for name, h in answers.items():
        got[name] = (h["mode"], h["k"], h["answer"], [p["id"] for p in h["passages"]][:5])  # the CLI prints the first 5
    return got
