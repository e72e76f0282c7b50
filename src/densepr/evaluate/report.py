"""Result tables (markdown, rich) and top-k accuracy plots (like DPR's Figure 1)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_write, read_json, write_json

KS = (1, 5, 20, 100)


def _save_png(fig, path: str | os.PathLike[str]) -> None:
    """Render a matplotlib figure to PNG and write it atomically."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())


def markdown_table(results: dict, ks: Sequence[int] = KS, names: dict[str, str] | None = None) -> str:
    """Markdown table of top-k accuracy (%), all questions and the answerable subset.

    Args:
        results: ``{dataset: {"n_all": N, "n_answerable": M, "methods": {method: accuracy_report}}}``.
        names: display names of methods.
    """
    names = names or {}
    head = ["dataset", "method", *[f"top-{k}" for k in ks], *[f"ans. top-{k}" for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (2 * len(ks))) + "|"]
    for ds, entry in results.items():
        label = f"{ds} ({entry['n_all']} q, {entry['n_answerable']} answerable)"
        for i, (method, rep) in enumerate(entry["methods"].items()):
            cells = [label if i == 0 else "", names.get(method, method)]
            cells += [f"{rep['all'][f'top{k}']:.1f}" for k in ks]
            cells += [f"{rep['answerable'][f'top{k}']:.1f}" for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Short column names for the paper-style table (the embedded sets' names).
SET_LABELS = {"nq-test": "NQ", "trivia-test": "TriviaQA", "wq-test": "WQ", "curated-test": "TREC", "squad-test": "SQuAD"}


def paper_table(results: dict, methods: Sequence[str], names: dict[str, str] | None = None, subset: str = "all",
                ks: tuple[int, int] = (20, 100)) -> str:  # fmt: skip
    """Markdown table laid out like DPR's Table 2: a row per method, a column per dataset, ``top-20 / top-100``.

    Args:
        results: as :func:`markdown_table`.
        methods: the rows, in order (methods absent from a dataset show "-").
        subset: ``"all"`` questions or the ``"answerable"`` subset.
    """
    names = names or {}
    sets = list(results)
    head = ["method", *[f"{SET_LABELS.get(ds, ds)} ({results[ds]['n_all' if subset == 'all' else 'n_answerable']} q)" for ds in sets]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(sets)]
    for m in methods:
        cells = [names.get(m, m)]
        for ds in sets:
            rep = results[ds]["methods"].get(m)
            cells.append("-" if rep is None else " / ".join(f"{rep[subset][f'top{k}']:.1f}" for k in ks))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_table(results: dict, methods: Sequence[str], names: dict[str, str] | None = None, k: int = 20) -> str:
    """Each method's top-k (all / answerable) per dataset and its gain over the row above (points)."""
    names = names or {}
    sets = list(results)
    head = ["method", *[SET_LABELS.get(ds, ds) for ds in sets]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(sets)]
    prev = None
    for m in methods:
        cells = [names.get(m, m)]
        for ds in sets:
            rep = results[ds]["methods"][m]
            a, b = rep["all"][f"top{k}"], rep["answerable"][f"top{k}"]
            cell = f"{a:.1f} / {b:.1f}"
            if prev is not None:
                p = results[ds]["methods"][prev]
                cell += f" ({a - p['all'][f'top{k}']:+.1f} / {b - p['answerable'][f'top{k}']:+.1f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
        prev = m
    return "\n".join(lines) + "\n"


def rich_table(results: dict, ks: Sequence[int] = KS, names: dict[str, str] | None = None, title: str = ""):
    """The same table for the terminal."""
    from rich.table import Table

    names = names or {}
    table = Table(title=title or None, show_lines=False)
    table.add_column("dataset")
    table.add_column("method")
    for k in ks:
        table.add_column(f"top-{k}", justify="right")
    for k in ks:
        table.add_column(f"ans. top-{k}", justify="right", style="cyan")
    for ds, entry in results.items():
        for i, (method, rep) in enumerate(entry["methods"].items()):
            label = f"{ds}\n{entry['n_all']} q, {entry['n_answerable']} answerable" if i == 0 else ""
            table.add_row(label, names.get(method, method), *[f"{rep['all'][f'top{k}']:.1f}" for k in ks],
                          *[f"{rep['answerable'][f'top{k}']:.1f}" for k in ks], end_section=i == len(entry["methods"]) - 1)  # fmt: skip
    return table


def plot_topk(curves: dict, path: str | os.PathLike[str], names: dict[str, str] | None = None, title: str = "") -> None:
    """Top-k accuracy against k (1..100), one panel per dataset, all questions above and the
    answerable subset below. Written atomically as PNG.

    Args:
        curves: ``{dataset: {method: {"all": [acc@1..K], "answerable": [...]}}}`` in percent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    datasets = list(curves)
    fig, axes = plt.subplots(2, len(datasets), figsize=(3.6 * len(datasets), 6.4), squeeze=False, sharex=True)
    for col, ds in enumerate(datasets):
        for row, subset in enumerate(("all", "answerable")):
            ax = axes[row][col]
            for method, c in curves[ds].items():
                y = np.asarray(c[subset])
                ax.plot(np.arange(1, len(y) + 1), y, label=names.get(method, method), linewidth=1.6)
            ax.set_xscale("log")
            ax.set_xticks([1, 5, 20, 100])
            ax.set_xticklabels(["1", "5", "20", "100"])
            ax.grid(alpha=0.3)
            ax.set_title(f"{ds} ({subset})", fontsize=10)
            if col == 0:
                ax.set_ylabel("top-k accuracy (%)")
            if row == 1:
                ax.set_xlabel("k")
    axes[0][0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save_png(fig, path)


# -- end-to-end QA ---------------------------------------------------------------------------------
def qa_markdown(results: dict) -> str:
    """Markdown tables of end-to-end EM (and F1, retrieval top-k) per set, mode and k.

    Args:
        results: what ``densepr evaluate-qa`` writes to ``qa-results.json``.
    """
    ks = results["ks"]
    head = ["dataset", "retrieval", *[f"EM@{k}" for k in ks], *[f"ans. EM@{k}" for k in ks], *[f"F1@{k}" for k in ks],
            *[f"top-{k}" for k in ks]]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (4 * len(ks))) + "|"]
    for name, res in results["sets"].items():
        label = f"{name} ({res['n_all']} q, {res['n_answerable']} answerable)"
        rows = [(mode, entry["k"]) for mode, entry in res["modes"].items()]
        rows += [(f"{mode}, fused selection", entry["fused"]["k"]) for mode, entry in res["modes"].items() if "fused" in entry]
        for i, (mode, per_k) in enumerate(rows):
            row = [per_k[str(k)] for k in ks]
            cells = [label if i == 0 else "", mode, *[f"{r['em']:.1f}" for r in row], *[f"{r['em_answerable']:.1f}" for r in row],
                     *[f"{r['f1']:.1f}" for r in row], *[f"{r['retrieval_topk']:.1f}" for r in row]]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    gold = {n: r["gold"] for n, r in results["sets"].items() if "gold" in r}
    if gold:
        out += "\nReader upper bound (EM / F1 reading only the best-ranked answer-bearing passage):\n\n"
        out += "| dataset | questions with such a passage | EM | F1 |\n|---|---:|---:|---:|\n"
        out += "".join(f"| {n} | {g['questions']} | {g['em']:.1f} | {g['f1']:.1f} |\n" for n, g in gold.items())
    return out


def plot_qa(results: dict, path: str | os.PathLike[str]) -> None:
    """End-to-end EM against the number of passages read, one panel per set (cf. DPR's Figure 3): DPR's rule
    solid, the fused selection (when tuned) dotted in the same colour, the gold-passage bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets, ks = list(results["sets"]), results["ks"]
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.4), squeeze=False)
    for col, name in enumerate(sets):
        ax = axes[0][col]
        res = results["sets"][name]
        for i, (mode, entry) in enumerate(res["modes"].items()):
            color = f"C{i}"
            ax.plot(ks, [entry["k"][str(k)]["em"] for k in ks], marker="o", label=f"{mode}, DPR's rule", linewidth=1.6, color=color)
            if "fused" in entry:  # the selection tuned on held-out questions, beside DPR's rule
                ax.plot(ks, [entry["fused"]["k"][str(k)]["em"] for k in ks], marker="s", linestyle=":", label=f"{mode}, fused", linewidth=1.6, color=color)
        if "gold" in res:
            ax.axhline(res["gold"]["em"], color="grey", linestyle="--", linewidth=1, label="gold passage")
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("passages read (k)")
        if col == 0:
            ax.set_ylabel("exact match (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


QA_RESULTS = ("qa-results.json", "qa-results.md", "qa-em.png")  # what write_qa_results writes into its directory


def write_qa_results(output: str | os.PathLike[str], results: dict) -> None:
    """``densepr evaluate-qa``'s files in ``output`` (each written atomically): ``results`` as qa-results.json,
    its tables (:func:`qa_markdown`) as qa-results.md, and the EM plot (:func:`plot_qa`) as qa-em.png."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "qa-results.json", results)
    with atomic_write(output / "qa-results.md") as fh:
        fh.write(qa_markdown(results))
    plot_qa(results, output / "qa-em.png")


def read_qa_results(output: str | os.PathLike[str], log: Callable[[str], None] = lambda _: None) -> dict:
    """The sets an earlier :func:`write_qa_results` wrote into ``output`` (none when absent or unreadable: read again)."""
    output = Path(output)
    if not (output / "qa-results.json").is_file():
        return {}
    try:
        sets = read_json(output / "qa-results.json").get("sets", {})
    except (DenseprError, AttributeError) as e:
        log(f"{output}/qa-results.json: unreadable ({e}); its sets are read again")
        return {}
    return sets if isinstance(sets, dict) else {}
