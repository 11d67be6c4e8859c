import json
import os
import shutil

import faiss
import numpy as np
import pytest

from retriever.data.sources import read_source
from retriever.embed import EmbedConfig, embed_items
from retriever.errors import ModelMismatchError, UserError
from retriever.indexes import BuildConfig, build_index, choose_index, read_index_manifest
from retriever.indexes.choose import ivf_nlist
from retriever.models.load import load_model
from retriever.search import Retriever
from retriever.shards import ShardSet


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model, emoji_folder):
    out = tmp_path_factory.mktemp("shards")
    embed_items(read_source(emoji_folder), tiny_model, out, EmbedConfig(shard_size=24, num_workers=0))
    return out


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(shards, out)
    return out


def test_manifest_records_model_counts_and_rows(index_dir, shards, tiny_model):
    m = read_index_manifest(index_dir)
    assert m.model == tiny_model.identity.to_dict()
    assert set(m.indexes) == {"image", "text"}
    for entry in m.indexes.values():
        assert entry.count == 64 and entry.metric == "inner_product" and entry.factory == "Flat"
        assert faiss.read_index(str(index_dir / entry.file)).ntotal == 64
    assert [f["name"] for f in m.shards["files"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # No temp folders left; the writer's lock file stays beside the index (see retriever/locks.py).
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".") and p.name != ".index.lock"]


def test_image_to_image_finds_itself_with_score_one(index_dir, tiny_model, emoji_folder):
    r = Retriever(index_dir, tiny_model)
    for item in read_source(emoji_folder)[::9]:
        hit = r.search(image=item.path, k=3, keep_query=True)[0]
        assert hit.id == item.index and hit.path == item.path
        assert hit.score == pytest.approx(1.0, abs=1e-4)
        left_out = r.search(image=item.path, k=3)  # by default a query image is not its own hit
        assert item.index not in [h.id for h in left_out] and len(left_out) == 3
        assert left_out.report.excluded_query_items == 1


def test_caption_text_search_finds_its_row_first_in_text_index(index_dir, tiny_model, emoji_folder):
    r = Retriever(index_dir, tiny_model)
    for item in read_source(emoji_folder)[::7]:
        hit = r.search(text=item.caption, k=5, modality="text")[0]
        assert (hit.id, hit.caption) == (item.index, item.caption)


def test_image_to_text_and_k_larger_than_index(index_dir, tiny_model, emoji_folder):
    r = Retriever(index_dir, tiny_model)
    res = r.search(image=read_source(emoji_folder)[0].path, k=500, modality="text")
    assert len(res) == 64 and [x.rank for x in res] == list(range(1, 65))
    assert all(res[i].score >= res[i + 1].score for i in range(63))


def test_retriever_loads_the_model_named_in_the_manifest(index_dir, emoji_folder):
    r = Retriever(index_dir)  # no model given: rebuilt from the manifest's identity
    item = read_source(emoji_folder)[5]
    assert r.search(image=item.path, k=1, keep_query=True)[0].id == item.index


def test_mismatched_model_is_refused(tiny, index_dir, tmp_path):
    other = load_model("RN50", "random")  # other architecture, other weights
    with pytest.raises(ModelMismatchError, match="use the same model"):
        Retriever(index_dir, other)
    cfg = tiny.model_cfg
    cfg["text_cfg"]["layers"] = 1
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelMismatchError):
        Retriever(index_dir, load_model(str(tmp_path / "other.json")))


def test_shard_folder_of_another_model_cannot_be_mixed(shards, tmp_path, emoji_folder):
    other = load_model("RN50", "random")
    mixed = tmp_path / "mixed"
    shutil.copytree(shards, mixed)
    embed_items(read_source(emoji_folder)[:4], other, tmp_path / "o", EmbedConfig(num_workers=0))
    shutil.copy(tmp_path / "o" / "part-00000.parquet", mixed / "part-00009.parquet")
    with pytest.raises(UserError, match="different model"):
        build_index(mixed, tmp_path / "idx")


def test_no_captions_means_no_text_index_and_a_clear_error(tmp_path, tiny_model, emoji_folder):
    items = [type(it)(it.index, it.path, ()) for it in read_source(emoji_folder)[:8]]
    embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(num_workers=0))
    build_index(tmp_path / "s", tmp_path / "i")
    r = Retriever(tmp_path / "i", tiny_model)
    assert r.modalities == ["image"]
    with pytest.raises(UserError, match="no text index"):
        r.search(text="x", modality="text")


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_index_types_find_exact_copies(tmp_path, shards, tiny_model, index_type):
    build_index(shards, tmp_path / "i", BuildConfig(index_type=index_type))
    m = read_index_manifest(tmp_path / "i")
    assert m.indexes["image"].factory.lower().startswith(index_type)
    r = Retriever(tmp_path / "i", tiny_model)
    vecs = np.concatenate([v for v, _ in ShardSet(shards).iter_vectors("image")])
    scores, rows = r.search_raw(vecs[:16], 1, "image")
    assert (rows[:, 0] == np.arange(16)).mean() >= 0.9


def test_default_choice_by_size():
    assert choose_index(1_000, 512).factory == "Flat"
    assert choose_index(500_000, 512).factory.startswith("HNSW")
    assert choose_index(500_000, 512, "ivf").factory == f"IVF{ivf_nlist(500_000)},Flat"
    spec = choose_index(5_000_000, 512)  # no budget given: the compressed, re-ranked ladder top
    assert spec.factory.startswith("OPQ") and f"IVF{ivf_nlist(5_000_000)}_HNSW" in spec.factory
    assert spec.train_size > 0
    with pytest.raises(UserError):
        choose_index(10, 8, "bogus")


@pytest.mark.parametrize(
    "code",
    [
        "import retriever.indexes, retriever.indexes.add, retriever.search, retriever.info",
        "from retriever import read_source, SourceItem, build_index, BuildConfig, Retriever, ShardSet",
        "import retriever.data, retriever.data.sources, retriever.data.images",
        "import retriever.cli.app",
    ],
)
def test_light_imports_do_not_import_torch(code):
    """Index-only work stays light: torch alone is ~1 GB of RSS and seconds of start-up."""
    import subprocess
    import sys

    probe = f"import sys\n{code}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_folder_facts_flow_from_source_through_shards_into_hits(index_dir, shards, tiny_model, emoji_folder):
    from retriever.shards import ShardSet

    item = read_source(emoji_folder)[4]
    assert {f.name for f in ShardSet(shards).metadata_fields} == {"dir", "bytes", "mtime"}
    with Retriever(index_dir, tiny_model) as r:
        hit = r.search(image=item.path, k=1, keep_query=True)[0]
        assert hit.metadata["dir"] == item.metadata["dir"] and hit.metadata["bytes"] == os.path.getsize(item.path)
        assert hit.to_dict()["metadata"]["mtime"].endswith("+00:00")
        only = r.search(image=item.path, k=5, where=f"dir = '{item.metadata['dir']}'")
        assert len(only) == 5 and {h.metadata["dir"] for h in only} == {item.metadata["dir"]}


def test_vector_search_does_not_import_torch(index_dir):
    import subprocess
    import sys

    probe = (
        "import sys, numpy as np\nfrom retriever import Retriever\n"
        f"r = Retriever({str(index_dir)!r})\n"
        "hits = r.search_vectors(np.ones((1, r.identity.embed_dim), np.float32), 3)\n"
        "print(len(hits[0]), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "False"]


def test_small_searches_run_on_one_thread_and_large_ones_keep_the_pool(monkeypatch):
    from retriever.indexes import settings

    small = faiss.IndexFlatIP(64)
    small.add(np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32))
    faiss.omp_set_num_threads(2)
    seen = []
    with settings.search_threads(small, 1):
        seen.append(faiss.omp_get_max_threads())
    assert seen == [1] and faiss.omp_get_max_threads() == 2  # restored afterwards
    monkeypatch.setattr(settings, "SMALL_SEARCH_WORK", 500 * 64)  # the same search is now "large"
    with settings.search_threads(small, 1):
        seen.append(faiss.omp_get_max_threads())
    assert seen == [1, 2]
    ivf = faiss.index_factory(64, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.random.default_rng(1).standard_normal((2000, 64)).astype(np.float32))
    ivf.add(np.random.default_rng(2).standard_normal((2000, 64)).astype(np.float32))
    ivf.nprobe = 4
    assert settings.vectors_scanned(ivf) == 16 + 2000 * 4 / 16
