"""``densepr``: a thin command line over the library, one subcommand per pipeline stage.

Errors from bad input print one line (file, line, field, what was expected) and exit 1;
``--debug`` shows the traceback instead. ``--quiet`` (before or after the command) drops progress bars
and log lines; ``--version`` prints the installed version.

Commands only parse options, check where they will write (before any work) and call the library.
One module per command group:

- ``common``: the typer apps, options shared by several commands, output checks, the default index, one-line errors;
- ``data``: ``data fetch``, ``data passages``, ``data split``, ``data build-train``;
- ``index``: ``index bm25``, ``index dense``, ``index plan``, ``encode`` (the embeddings a dense index is built from),
  ``verify`` (every artefact an index directory holds), ``export-index`` and ``export-run`` (for Pyserini and vector stores);
- ``retrieve``: ``retrieve``, ``tune-hybrid``, ``evaluate``, ``search``;
- ``train``: ``train`` (the bi-encoder);
- ``qa``: ``cloze-data``, ``train-reader``, ``answer``, ``tune-reader``, ``evaluate-qa``;
- ``serve``: ``serve``, ``export-onnx`` (the ONNX models it serves on CPUs);
- ``export``: ``export-model`` (DPR's Hugging Face classes), ``convert`` (pytorch_model.bin checkpoints to safetensors);
- ``reproduce``: ``reproduce``.

The table below registers them, in the order ``densepr --help`` lists them.
"""

from __future__ import annotations

import sys

from densepr.cli import data, export, index, qa, reproduce, retrieve, serve, train
from densepr.cli.common import DEFAULT_INDEX, TRAINED_INDEX, _error_line, _index, app, data_app, index_app
from densepr.cli.data import data_build_train
from densepr.cli.reproduce import parse_qa_limit
from densepr.errors import DenseprError
from densepr.progress import console, set_quiet

__all__ = ["DEFAULT_INDEX", "TRAINED_INDEX", "_index", "app", "data_build_train", "main", "parse_qa_limit"]

for _typer, _name, _command in (
    (app, "encode", index.encode),
    (app, "export-onnx", serve.export_onnx),
    (app, "export-model", export.export_model),
    (app, "convert", export.convert),
    (app, "retrieve", retrieve.retrieve),
    (app, "tune-hybrid", retrieve.tune_hybrid),
    (app, "evaluate", retrieve.evaluate),
    (app, "train", train.train_cmd),
    (app, "search", retrieve.search),
    (app, "reproduce", reproduce.reproduce),
    (app, "cloze-data", qa.cloze_data),
    (app, "train-reader", qa.train_reader_cmd),
    (app, "answer", qa.answer_cmd),
    (app, "tune-reader", qa.tune_reader_cmd),
    (app, "evaluate-qa", qa.evaluate_qa_cmd),
    (app, "serve", serve.serve_cmd),
    (app, "verify", index.verify_cmd),
    (app, "export-index", index.export_index),
    (app, "export-run", index.export_run),
    (data_app, "fetch", data.data_fetch),
    (data_app, "passages", data.data_passages),
    (data_app, "split", data.data_split),
    (data_app, "build-train", data.data_build_train),
    (index_app, "bm25", index.index_bm25),
    (index_app, "dense", index.index_dense),
    (index_app, "plan", index.index_plan),
):
    _typer.command(_name)(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user-facing errors print one line; ``--debug`` shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    set_quiet("--quiet" in args)  # anywhere, like --debug: one definition for every command
    args = [a for a in args if a != "--quiet"]
    try:
        app(args=args, prog_name="densepr")
    except (DenseprError, OSError) as e:
        if debug:
            raise
        set_quiet(False)  # errors print even under --quiet
        console.print(f"error: {_error_line(e)}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        set_quiet(False)
        console.print("interrupted", style="red")
        sys.exit(130)
