"""Nothing unsafe is ever loaded: a scan of densepr's own source (and its benchmarks) for pickle,
``torch.load``, ``np.load`` with pickles allowed, remote code (any ``from_pretrained`` or ``pipeline``
without ``trust_remote_code=False``), ``eval``/``exec``, and model weights loaded without ``use_safetensors=True``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def problems(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe construct in ``source`` as ``file:line: what``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = _name(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if func in ("eval", "exec"):
                out.append(f"{where}: calls {func}()")
            if func.endswith("torch.load"):
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where}: torch.load without weights_only=True")
            if func in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if not (isinstance(ap, ast.Constant) and ap.value is False):
                    out.append(f"{where}: np.load without allow_pickle=False")
            rc = kw.get("trust_remote_code")
            if rc is not None and not (isinstance(rc, ast.Constant) and rc.value is False):
                out.append(f"{where}: trust_remote_code is not False")
            elif rc is None and (func.endswith(".from_pretrained") or func.split(".")[-1] == "pipeline"):
                # said at every load (tokenizer, config, model, pipeline): a folder's auto_map never prompts or runs
                out.append(f"{where}: {func} without trust_remote_code=False")
            if func.endswith(".from_pretrained") and not any(s in func for s in ("Tokenizer", "Config", "tokenizer", "config")):
                st = kw.get("use_safetensors")
                if not (isinstance(st, ast.Constant) and st.value is True):
                    out.append(f"{where}: {func} without use_safetensors=True")
    return out


def test_the_scanner_catches_each_unsafe_construct():
    bad = """
import pickle
from joblib import load
import torch, numpy as np
torch.load("x")
np.load("x.npy")
np.load("x.npy", allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=True)
BertModel.from_pretrained(p, trust_remote_code=False)
eval("1")
AutoTokenizer.from_pretrained(p)
AutoConfig.from_pretrained(p)
transformers.pipeline("question-answering", model=p)
DPRReader.from_pretrained(p, use_safetensors=True)
"""
    found = problems(bad)
    assert sorted({int(f.split(":")[1]) for f in found}) == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], found
    assert len(found) == 13  # line 8 twice: remote code and no safetensors
    ok = """
import numpy as np, torch
torch.load("x", weights_only=True)
np.load("x.npy", allow_pickle=False)
AutoTokenizer.from_pretrained(p, trust_remote_code=False)
DPRReader.from_pretrained(p, use_safetensors=True, trust_remote_code=False)
pipeline("question-answering", model=p, trust_remote_code=False)
model.eval()
"""
    assert problems(ok) == []


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_source_has_nothing_unsafe(path):
    assert problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []
