"""`densepr encode --ray` on a real three-node Ray cluster: the single-process format and vectors,
resumption, and a node removed mid-run."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest

from densepr.data import Corpus, Passage, write_passages_tsv
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.models.encoder import Encoder
from tests.support.ray_cluster import cluster  # noqa: F401  (the shared cluster fixture)
from tests.support.tiny import PASSAGES

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_bert):
    d = tmp_path_factory.mktemp("ray-encode")
    corpus = Corpus.from_passages(Passage(f"p{i}", PASSAGES[i % 12][0], f"{PASSAGES[i % 12][1]} number {i}") for i in range(120))
    write_passages_tsv(corpus, d / "passages.tsv")
    encode_corpus(Encoder.load(tiny_bert, device="cpu"), corpus, d / "single", part_size=10)
    return d, tiny_bert


def _vectors(directory: Path) -> np.ndarray:
    return np.concatenate([np.load(f) for f in sorted(glob.glob(str(directory / "part-*.npy")))])


def test_ray_encode_equals_single_process_and_resumes(cluster, data):  # noqa: F811
    from densepr.index.ray_encode import encode_corpus_ray

    c, _ = cluster
    d, bert = data
    nodes: dict[int, str] = {}
    m = encode_corpus_ray(bert, d / "passages.tsv", d / "ray", address=c.address, part_size=10, on_part=lambda i, n: nodes.__setitem__(i, n))
    assert m["count"] == 120 and len(m["parts"]) == 12 and sorted(nodes) == list(range(12))
    assert np.array_equal(_vectors(d / "ray"), _vectors(d / "single"))  # float32, bit for bit
    assert Embeddings.open(d / "ray").dim == Embeddings.open(d / "single").dim
    assert (d / "ray/part-00003.ids").read_text() == (d / "single/part-00003.ids").read_text()
    # a killed driver: the manifest and two parts missing; a rerun encodes only those two
    (d / "ray/manifest.json").unlink()
    for i in (3, 7):
        (d / f"ray/part-{i:05d}.npy").unlink()
    again: list[int] = []
    encode_corpus_ray(bert, d / "passages.tsv", d / "ray", address=c.address, part_size=10, on_part=lambda i, n: again.append(i))
    assert sorted(again) == [3, 7] and np.array_equal(_vectors(d / "ray"), _vectors(d / "single"))
    # complete with the same settings: nothing to do
    done: list[int] = []
    encode_corpus_ray(bert, d / "passages.tsv", d / "ray", address=c.address, part_size=10, on_part=lambda i, n: done.append(i))
    assert done == []


def test_cli_encode_on_ray(cluster, data, capsys):  # noqa: F811
    from tests.support.cli import run

    c, _ = cluster
    d, bert = data
    code, out, err = run(capsys, "encode", str(d / "passages.tsv"), str(d / "cli"), "--encoder", str(bert), "--part-size", "40",
                         "--ray", c.address, "--ray-actors", "2")  # fmt: skip
    assert code == 0 and "120 passage vectors" in out and "(Ray)" in out, err
    assert np.array_equal(_vectors(d / "cli"), _vectors(d / "single"))
    code, _, err = run(capsys, "encode", str(d / "passages.tsv"), str(d / "cli2"), "--ray", c.address, "--num-shards", "2")
    assert code == 1 and "--ray splits the work itself" in err


def test_ray_encode_survives_a_lost_node(cluster, data):  # noqa: F811
    """A worker node that encoded a part is removed while parts are in flight: its actor restarts
    on a node that is left, the job completes, and the vectors still equal the single-process ones."""
    import ray

    from densepr.index.ray_encode import encode_corpus_ray

    c, workers = cluster
    d, bert = data
    by_node = {w.node_id: w for w in workers}
    seen: list[tuple[int, str]] = []
    removed: list[str] = []

    def on_part(i: int, node: str) -> None:
        seen.append((i, node))
        if not removed and node in by_node:
            c.remove_node(by_node[node])
            removed.append(node)

    m = encode_corpus_ray(bert, d / "passages.tsv", d / "lost", address=c.address, part_size=10, actors=2, on_part=on_part, throttle_s=0.5)
    assert removed, "no part was encoded on a worker node"
    after = [n for _, n in seen[seen.index(next(s for s in seen if s[1] == removed[0])) + 1 :]]
    # parts remained when the node went, and nodes that are left encoded some of them (parts the
    # removed node had finished before it went may still arrive afterwards: they were already done)
    assert len(after) >= 2 and any(n != removed[0] for n in after)
    assert m["count"] == 120 and sorted(i for i, _ in seen) == list(range(12))
    assert np.array_equal(_vectors(d / "lost"), _vectors(d / "single"))
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 2
    workers[:] = [w for w in workers if w.node_id != removed[0]] + [c.add_node(num_cpus=1, object_store_memory=100 * 2**20)]
    c.wait_for_nodes()  # leave the shared cluster at three nodes


def test_an_encoder_actor_reads_an_index_directorys_passages_through_its_store(tmp_path, corpus, tiny_bert):
    """Each Ray encoder actor opens the store of an index directory's passages.tsv (memory-mapped: at 21M
    passages a parsed corpus is ~17 GB per actor) and encodes the same rows; another corpus is refused."""
    from densepr.data import write_passages_tsv
    from densepr.data.store import StoreCorpus, build_store
    from densepr.errors import DenseprError
    from densepr.index.ray_encode import PartEncoder

    write_passages_tsv(corpus, tmp_path / "idx" / "passages.tsv")
    build_store(tmp_path / "idx" / "passages.tsv", tmp_path / "idx" / "store")
    args = dict(encoder=str(tiny_bert), fingerprint=corpus.fingerprint(), part_size=5, batch_size=4, device="cpu")
    actor = PartEncoder(passages=str(tmp_path / "idx" / "passages.tsv"), **args)
    assert isinstance(actor.corpus, StoreCorpus)
    assert list(actor.corpus.texts[0:5]) == list(corpus.texts[0:5])
    write_passages_tsv(corpus, tmp_path / "elsewhere.tsv")  # no store: parsed, as before
    assert list(PartEncoder(passages=str(tmp_path / "elsewhere.tsv"), **args).corpus.ids) == list(corpus.ids)
    with pytest.raises(DenseprError, match="is not the driver's corpus"):
        PartEncoder(passages=str(tmp_path / "idx" / "passages.tsv"), **{**args, "fingerprint": {"other": 1}})
