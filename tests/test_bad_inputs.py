"""Every item of a hostile corpus ends embedded or reported, and none crashes the run (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bad_inputs import make_containers, make_folder, make_manifests
from conftest import TINY_CONFIG
from typer.testing import CliRunner

from retriever.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, emoji_items) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad") / "corpus"
    return root, make_folder(root, [Path(it.path) for it in emoji_items[:2]])


def embed(source: Path, out: Path) -> tuple[dict, list[str], list[dict]]:
    res = runner.invoke(
        app, ["embed", str(source), "--out", str(out), "--model", TINY_CONFIG, "--workers", "0", "--json"]
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads(res.stdout)
    paths = [p for f in sorted(out.glob("part-*.parquet")) for p in pq.read_table(f).column("path").to_pylist()]
    errors_file = out / "_errors.jsonl"
    errors = [json.loads(line) for line in errors_file.read_text().splitlines()] if errors_file.exists() else []
    return summary, paths, errors


def test_every_file_of_the_folder_is_embedded_reported_or_counted(corpus, tmp_path):
    root, expect = corpus
    summary, paths, errors = embed(root, tmp_path / "s")
    fate = {str(Path(p).relative_to(root)): "embedded" for p in paths}
    for e in errors:
        rel = str(Path(e["path"]).relative_to(root))
        assert rel not in fate, f"{rel} both embedded and reported"
        assert e["reason"], rel
        fate[rel] = "reported"
    wanted = {k: v for k, v in expect.items() if v != "not an image"}
    assert fate == wanted
    assert summary["not_images"] == sum(v == "not an image" for v in expect.values())
    assert summary["rows"] == sum(v == "embedded" for v in expect.values())


def test_every_row_of_each_bad_manifest_is_embedded_or_reported(corpus, tmp_path):
    root, _ = corpus
    manifests = make_manifests(tmp_path, root)
    for name, (n_embedded, n_reported) in manifests.items():
        _, paths, errors = embed(tmp_path / name, tmp_path / f"out-{name}")
        assert (len(paths), len(errors)) == (n_embedded, n_reported), (name, paths, errors)


def test_every_item_of_each_bad_container_is_embedded_or_reported(emoji_items, tmp_path):
    """Webdataset tars and image Parquet: captions that are not honest text are reported, never embedded
    as U+FFFD or a Python repr; the kept captions are the decoded text."""
    sources = make_containers(tmp_path / "c", [Path(emoji_items[0].path)])
    for name, (n_embedded, n_reported) in sources.items():
        out = tmp_path / f"out-{name}"
        _, paths, errors = embed(tmp_path / "c" / name, out)
        assert (len(paths), len(errors)) == (n_embedded, n_reported), (name, paths, errors)
        assert all(e["reason"] for e in errors), errors
        captions = [
            c for f in sorted(out.glob("part-*.parquet")) for c in pq.read_table(f).column("caption").to_pylist()
        ]
        assert not any(c and ("\ufffd" in c or c.startswith(("b'", "{")) or c == "1.5") for c in captions), captions
        if name == "captions.tar":
            assert set(captions) >= {"café with a BOM", "utf-16 café", "only in the sidecar", "the txt caption"}
            reported = {e["path"].rpartition("#")[2] for e in errors}
            assert reported == {"latin1", "binary", "struct", "number", "json-list", "not-json", "json-latin1", "cut"}
        if name == "binary-captions.parquet":
            assert captions == ["utf-8 bytes", "bom", "utf-16", None]
