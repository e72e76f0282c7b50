"""``densepr serve`` (HTTP, or a Ray Serve application) and ``densepr export-onnx`` (the ONNX
question encoder and reader it can serve on CPUs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from densepr.cli.common import DeviceOpt, IndexOpt, _check_output, _default, _index, _log, _options, out
from densepr.errors import DenseprError
from densepr.serve.limits import Limits


def _allowed_hosts(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    hosts = tuple(h.strip() for h in value.split(",") if h.strip())
    if not hosts:
        raise DenseprError("--allowed-hosts: give at least one name (or * for any)")
    return hosts


def serve_cmd(
    ctx: typer.Context,
    index: IndexOpt = None,
    reader: Annotated[Optional[Path], typer.Option(help="Reader directory: enables POST /answer and answers on the page (default: <index>/reader when present).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (default loopback only; 0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_question_chars: int = _default(Limits, "max_question_chars"),
    max_k: int = _default(Limits, "max_k"),
    max_questions: Annotated[int, typer.Option(help="Questions per /search request.")] = _default(Limits, "max_questions"),
    max_body_bytes: int = _default(Limits, "max_body_bytes"),
    timeout: Annotated[float, typer.Option(help="Per-request time limit in seconds.")] = _default(Limits, "timeout_s"),
    max_batch: Annotated[int, typer.Option(help="Questions per micro-batch (1 = no micro-batching).")] = _default(Limits, "max_batch"),
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = _default(Limits, "max_wait_ms"),
    max_queue: Annotated[int, typer.Option(help="Questions that may wait for the model; more get 503 with Retry-After.")] = _default(Limits, "max_queue"),
    max_k_answer: Annotated[int, typer.Option(help="Passages /answer may read per question (its k).")] = _default(Limits, "max_k_answer"),
    max_answer_passages_queued: Annotated[int, typer.Option(help="Passages that may wait for the reader (k per /answer); more get 503 with Retry-After.")] = _default(Limits, "max_answer_passages_queued"),
    max_answers: Annotated[int, typer.Option(help="Gold answers per question in /search 'answers'.")] = _default(Limits, "max_answers"),
    max_answer_chars: Annotated[int, typer.Option(help="Characters in one gold answer.")] = _default(Limits, "max_answer_chars"),
    max_answers_total_chars: Annotated[int, typer.Option(help="Characters in all gold answers of one request.")] = _default(Limits, "max_answers_total_chars"),
    read_timeout: Annotated[float, typer.Option(help="Seconds for a whole request (headers and body) to arrive; else 408 and close.")] = _default(Limits, "read_timeout_s"),
    timeout_keep_alive: Annotated[float, typer.Option(help="Seconds an idle keep-alive connection stays open.")] = _default(Limits, "keep_alive_s"),
    max_connections: Annotated[int, typer.Option(help="Open connections at once; when full, the one idle longest without a complete request is closed, else 503.")] = _default(Limits, "max_connections"),
    max_connections_per_client: Annotated[int, typer.Option(help="Open connections from one IP address (the same rule within them).")] = _default(Limits, "max_connections_per_client"),
    first_byte_timeout: Annotated[float, typer.Option(help="Seconds a new connection may stay silent before it is closed.")] = _default(Limits, "first_byte_timeout_s"),
    send_timeout: Annotated[float, typer.Option(help="Seconds to send a whole response (a slow reader is then cut off).")] = _default(Limits, "send_timeout_s"),
    allowed_hosts: Annotated[Optional[str], typer.Option(help="Host header names answered, comma-separated (any port; *.example.com: its subdomains; *: any). Default: localhost, 127.0.0.1, [::1] and the address when bound to loopback; any otherwise.")] = None,
    device: DeviceOpt = None,
    question_encoder: Annotated[Optional[str], typer.Option(help="Another question encoder than the index's: a model directory, or a `densepr export-onnx` output (append #int8 for its int8 model).")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Serve as a Ray Serve application: `local`, `auto` or a cluster address (densepr[ray]).")] = None,
    ray_replicas: Annotated[Optional[str], typer.Option(help="With --ray: replicas per deployment, e.g. router=2,encoder=1,searcher=4,reader=2,cpus=1 (searcher: per shard; shards=N: searcher shards, default the dense index's --num-shards).")] = None,
) -> None:
    """Serve search (and answers, with --reader) over HTTP, with a web page at /; on a Ray cluster with --ray."""
    index = _index(index)
    try:
        from densepr.serve.app import create_app, serve
        from densepr.serve.limits import Limits
        from densepr.serve.service import Service
    except ImportError:
        raise DenseprError("`densepr serve` needs the serve extra: pip install 'densepr[serve]'") from None
    from densepr.models.reader import Reader
    from densepr.retrieve.retriever import Retriever

    renamed = {"timeout_s": "--timeout", "read_timeout_s": "--read-timeout", "keep_alive_s": "--timeout-keep-alive",
               "first_byte_timeout_s": "--first-byte-timeout", "send_timeout_s": "--send-timeout"}  # fmt: skip
    with _options(**renamed):  # Limits checks its values
        limits = Limits(max_question_chars=max_question_chars, max_k=max_k, max_questions=max_questions, max_body_bytes=max_body_bytes,
                        timeout_s=timeout, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_answers=max_answers,
                        max_answer_chars=max_answer_chars, max_answers_total_chars=max_answers_total_chars, read_timeout_s=read_timeout,
                        keep_alive_s=timeout_keep_alive, max_connections=max_connections, max_connections_per_client=max_connections_per_client,
                        first_byte_timeout_s=first_byte_timeout, send_timeout_s=send_timeout,
                        max_k_answer=max_k_answer, max_answer_passages_queued=max_answer_passages_queued,
                        allowed_hosts=_allowed_hosts(allowed_hosts))  # fmt: skip
    from densepr.pipeline import find_reader

    if ray is not None:
        unavailable = ("read_timeout", "max_connections", "max_connections_per_client", "first_byte_timeout", "send_timeout")
        given = {p for p in (*unavailable, "timeout_keep_alive")  # by name: typer may vendor its own click
                 if ctx.get_parameter_source(p).name not in ("DEFAULT", "DEFAULT_MAP")}  # fmt: skip
        if given & set(unavailable):  # Ray Serve's proxy owns the connections and has no such limits
            flags = " and ".join(f"--{p.replace('_', '-')}" for p in unavailable if p in given)
            raise DenseprError(f"{flags}: not available with --ray (Ray Serve's HTTP proxy holds the connections and has no such "
                               "limit); drop it, or serve without --ray")  # fmt: skip
        from densepr.serve.ray_app import Replicas, run

        replicas = Replicas.parse(ray_replicas)
        _log(f"serving {index} on Ray ({ray}) at http://{host}:{port}/  (replicas: {replicas})")
        run(index, reader or find_reader(index), limits, replicas, address=ray, host=host, port=port, device=device,
            keep_alive_s=timeout_keep_alive if "timeout_keep_alive" in given else None, question_encoder=question_encoder)  # fmt: skip
        return
    r = Retriever.load(index, question_encoder=question_encoder, device=device)
    reader = reader or find_reader(index)  # the reader beside the index, when there is one
    rd = Reader.load(reader, device) if reader else None
    app_ = create_app(Service(r, rd, limits))
    _log(f"serving {len(r.corpus)} passages ({', '.join(r.modes)}{', reader' if rd else ''}) on http://{host}:{port}/  (API docs: /docs)")
    serve(app_, host, port, limits=limits)


def export_onnx(
    encoder: Annotated[Path, typer.Argument(help="Encoder directory, or a checkpoint with question_encoder/ (e.g. runs/dpr/models/round2/best), or a trained reader (e.g. runs/dpr/reader).")],
    output: Annotated[Path, typer.Argument(help="Directory to write (replaced atomically).")],
    int8: Annotated[bool, typer.Option("--int8", help="Also write the int8-quantised model (use it as OUTPUT#int8).")] = False,
) -> None:
    """Export the question encoder (`densepr serve --question-encoder OUTPUT[#int8]`) or a reader
    (`--reader OUTPUT[#int8]`) to ONNX for CPU serving."""
    from densepr.models.kind import is_reader_dir

    is_reader = is_reader_dir(encoder)
    _check_output(output, "dir", "ONNX reader" if is_reader else "ONNX question encoder", inputs=(encoder,))
    try:
        from densepr.models.onnx import export_question_encoder
        from densepr.models.reader import export_reader
    except ImportError:
        raise DenseprError("export-onnx needs the onnx extra: pip install 'densepr[onnx]'") from None
    if is_reader:
        cfg = export_reader(encoder, output, int8=int8)
        out.print(f"reader exported to {output}: {', '.join(cfg['files'])}")
        return
    cfg = export_question_encoder(encoder, output, int8=int8)
    out.print(f"question encoder ({cfg['dim']}-d) exported to {output}: {', '.join(cfg['files'])}")
