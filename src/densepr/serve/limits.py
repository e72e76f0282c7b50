"""What one request may ask for (:class:`Limits`), the errors a request is refused or failed with
(:class:`ApiError`, :class:`LimitError`), and the JSON bytes responses are written as."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from typing import Any

from densepr.errors import ConfigError, DenseprError

log = logging.getLogger("densepr.serve")


@dataclass
class Limits:
    """What one request, and all of them together, may ask for."""

    max_question_chars: int = 1000
    max_k: int = 100
    max_questions: int = 64  # questions in one /search request
    max_body_bytes: int = 256 * 1024
    timeout_s: float = 30.0  # per request, queueing included
    max_batch: int = 64  # questions per micro-batch (1 = no micro-batching)
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # questions waiting for the retriever, all requests together (more: 503 + Retry-After)
    # /answer reads k passages per question, and reading costs ~20 ms a passage on a 2-core CPU (docs/reader.md):
    # k up to 50, the largest k evaluate-qa measures and tune-reader chooses from (pipeline.QA_KS), so the
    # reader's tuned k always fits; and at most 1,000 passages waiting for the reader, ~20 s of reading there,
    # inside timeout_s (more: 503 + Retry-After; larger-k requests are shed first)
    max_k_answer: int = 50
    max_answer_passages_queued: int = 1000
    max_answers: int = 32  # gold answers per question in /search "answers"
    max_answer_chars: int = 500  # characters in one gold answer
    max_answers_total_chars: int = 20_000  # characters in all the gold answers of one request
    read_timeout_s: float = 10.0  # a whole request (headers and body) must arrive within this; a stalled reader is cut off after it
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections; when full, the longest-idle one without a complete request is closed, else 503
    max_connections_per_client: int | None = 64  # open connections from one IP address (the same rule within them)
    first_byte_timeout_s: float = 3.0  # a new connection must send its first byte within this, else it is closed
    send_timeout_s: float = 60.0  # a response must be sent within this from its start, else the connection is closed
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered (any port; "*.x" subdomains, "*" any); None: by the bind address

    def __post_init__(self) -> None:
        """Refuse a limit that would refuse every request, or time out at once: every number must be
        positive (``max_wait_ms`` may be 0: no waiting for company)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allowed_hosts" or value is None:
                continue
            if f.name == "max_wait_ms":
                if value < 0:
                    raise ConfigError(f.name, "must not be negative")
            elif value <= 0:
                raise ConfigError(f.name, "must be positive")


class ApiError(Exception):
    """An error answered as JSON ``{"error": message, **extra}`` with ``status`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


class LimitError(ApiError):
    """A request over one of the :class:`Limits` (``{"error": ..., "limit": name}``)."""

    def __init__(self, status: int, limit: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers, limit=limit)
        self.limit = limit


# What tokenizers and densepr raise for text they cannot take (a fast tokenizer raises TypeError
# for a string it cannot encode, e.g. one holding a lone surrogate).
INPUT_ERRORS = (DenseprError, ValueError, UnicodeError, TypeError)


def as_api_error(exc: BaseException) -> ApiError:
    """What one request is answered when its own model call raised ``exc``.

    Input errors (what tokenizers and densepr raise for text they cannot take) are the
    request's fault: 422 with the message. Anything else is ours: a 500 that names the
    exception type only (messages of unexpected errors may hold local paths); the traceback
    goes to the log.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, INPUT_ERRORS):
        return ApiError(422, f"this request's input could not be processed: {type(exc).__name__}: {str(exc)[:300]}")
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error while serving this request ({type(exc).__name__})")


def check_text(s: str, field: str) -> None:
    """Refuse strings that are not Unicode text (lone surrogates from JSON ``\\ud800`` escapes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LimitError(422, field, f"{field} is not valid Unicode text (lone surrogate at character {e.start})") from None


def dump_json(obj: Any) -> bytes:
    """JSON bytes as FastAPI's JSONResponse writes them."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
