"""``densepr export-model``: a model in another tool's own layout (``--format dpr``: Hugging Face's DPR classes);
``densepr convert``: a checkpoint that ships only pytorch_model.bin, with safetensors weights.

sentence-transformers needs no export: every encoder densepr saves already carries its files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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


def convert(
    model: Annotated[Path, typer.Argument(help="A checkpoint folder whose weights are pytorch_model.bin (sub-folders too: Haystack's query_encoder/ + passage_encoder/, Tevatron's query_model/ + passage_model/).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="New directory to write (default: MODEL-safetensors beside it).")] = None,
) -> None:
    """Rewrite a pytorch_model.bin checkpoint with model.safetensors (read as tensors only: a pickle payload is refused)."""
    from densepr.models.convert import convert_checkpoint, default_output

    output = output or default_output(model)
    _check_output(output, "dir", "converted checkpoint", inputs=(model,))
    res = convert_checkpoint(model, output)
    left = f"; left out: {', '.join(res['left_out'])}" if res["left_out"] else ""
    out.print(f"{output}: model.safetensors written for {', '.join(res['converted'])}, {res['copied']} files copied{left}")
