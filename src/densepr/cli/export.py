"""``densepr export-model``: a model in another tool's own layout (``--format dpr``: Hugging Face's DPR classes).

sentence-transformers needs no export: every encoder densepr saves already carries its files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from densepr.cli.common import _check_output, out


def export_model(
    model: Annotated[Path, typer.Argument(help="An encoder directory, a bi-encoder checkpoint (question_encoder/ + passage_encoder/, e.g. runs/dpr/models/round2/best) or a trained reader (e.g. runs/dpr/reader).")],
    output: Annotated[Path, typer.Argument(help="New directory to write: question_encoder/ + ctx_encoder/ for encoders, a DPRReader directory for a reader.")],
    format: Annotated[str, typer.Option("--format", help="dpr: DPRQuestionEncoder/DPRContextEncoder or DPRReader (CLS-pooled, unnormalised BERT encoders).")] = "dpr",
) -> None:
    """Export a bi-encoder or reader as Hugging Face's DPR classes (`DPRQuestionEncoder.from_pretrained(OUTPUT/question_encoder)`)."""
    from densepr.models.export_dpr import export_model as run

    _check_output(output, "dir", "export", inputs=(model,))
    res = run(model, output, format)
    out.print(f"{res['source']} exported as {res['format']}: {', '.join(res['dirs'])}")
