"""The `retriever` command end to end on 64 real Twemoji images (tiny random-init model)."""

import json
import os
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from retriever.cli.app import app

runner = CliRunner()


def run(*args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output + (str(res.exception) if res.exception else "")
    return res


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory, emoji_folder):
    tmp = tmp_path_factory.mktemp("cli")
    run("embed", emoji_folder, "--out", tmp / "shards", "--model", tiny.config, "--shard-size", "20", "--workers", "0")
    run("index", tmp / "shards", "--out", tmp / "index")
    return tmp


def test_embed_index_search_info(built, emoji_folder):
    from retriever.data.sources import read_source

    items = read_source(emoji_folder)
    res = run("search", built / "index", items[3].caption, "--modality", "text", "-k", "3", "--json")
    hits = json.loads(res.stdout)["hits"]
    assert hits[0]["id"] == 3 and hits[0]["caption"] == items[3].caption and len(hits) == 3
    res = run("search", built / "index", "--image", items[10].path, "--json", "--keep-query")
    hits = json.loads(res.stdout)["hits"]
    assert hits[0]["id"] == 10 and hits[0]["score"] > 0.999 and len(hits) == 10
    res = run("search", built / "index", "--image", items[10].path, "--modality", "text", "--json")
    assert len(json.loads(res.stdout)["hits"]) == 10
    table = run("search", built / "index", "a red apple", "-k", "2").stdout
    assert "rank" in table and "score" in table
    info = json.loads(run("info", built / "shards", "--json").stdout)
    assert (info["kind"], info["rows"], info["shards"]) == ("shards", 64, 4)
    info = json.loads(run("info", built / "index", "--json").stdout)
    assert info["indexes"]["image"]["count"] == 64
    assert "Flat" in run("info", built / "index").stdout


def test_rerun_of_finished_embed_resumes_everything(tiny, built, emoji_folder):
    res = run(
        "embed",
        emoji_folder,
        "--out",
        built / "shards",
        "--model",
        tiny.config,
        "--shard-size",
        "20",
        "--workers",
        "0",
        "--json",
    )
    out = json.loads(res.stdout)
    assert (out["rows"], out["shards_written"], out["shards_resumed"]) == (64, 0, 4)


def test_bad_images_are_counted_and_named(tiny, tmp_path, broken_folder):
    res = run("embed", broken_folder, "--out", tmp_path / "s", "--model", tiny.config, "--workers", "0")
    assert "6 rows" in res.stdout
    assert "Skipped 3 unreadable image(s)" in res.stderr and "truncated.png" in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "/no/such/folder", "--out", "x"], "does not exist"),
        (["search", "/no/such/index", "query"], "not a retriever index"),
        (["info", "/no/such/thing"], "does not exist"),
    ],
)
def test_user_errors_are_one_sentence_and_exit_1(args, message):
    res = run(*args, code=1)
    assert message in res.stderr and "Traceback" not in res.output


def test_empty_source_and_wrong_model_exit_1(tiny, tmp_path, built):
    (tmp_path / "empty").mkdir()
    assert (
        "no images" in run("embed", tmp_path / "empty", "--out", tmp_path / "s", "--model", tiny.config, code=1).stderr
    )
    res = run("search", built / "index", "x", "--model", "RN50", "--pretrained", "random", code=1)
    assert "use the same model" in res.stderr


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "retriever.cli.app", "search", str(tmp_path), "q"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "Error:" in proc.stderr and "Traceback" not in proc.stderr


def test_library_errors_name_parameters_and_the_cli_says_flags(tmp_path):
    from retriever.errors import ConfigError
    from retriever.training.config import TrainConfig

    with pytest.raises(ConfigError, match="unlock_text_last only makes sense with lock_text"):
        TrainConfig(source="-", out="-", unlock_text_last=1).validate()
    res = run("train", tmp_path, "--out", tmp_path / "run", "--unlock-text-last", "1", code=1)
    assert "--unlock-text-last only makes sense with --lock-text" in " ".join(res.stderr.split())


@pytest.mark.parametrize("command", sorted(typer.main.get_command(app).commands))
def test_every_flag_reads_in_full_at_80_columns(command):
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    res = subprocess.run(
        [sys.executable, "-m", "retriever", command, "--help"], env=env, capture_output=True, text=True, check=True
    )
    # Option rows: "│ *  --out  -o  <path>  help…"; names and metavars sit in the first half of the row.
    rows = [line for line in res.stdout.splitlines() if line[2:].lstrip()[:1] in ("-", "*")]
    assert rows and all(len(line) <= 80 for line in res.stdout.splitlines())
    cut = [row for row in rows if "…" in row[:40]]
    assert not cut, "\n".join(cut)


def test_cli_quiets_open_clip_chatter_but_not_retriever_warnings(caplog):
    import logging

    import open_clip.factory

    from retriever.cli.common import quiet_library_logs

    quiet_library_logs()
    root = logging.getLogger()
    chatter = root.makeRecord("root", logging.WARNING, open_clip.factory.__file__, 1, "open_clip chatter", None, None)
    root.handle(chatter)
    logging.getLogger("retriever.training.loop").warning("Skipped an unreadable training image: x.png")
    shown = [r.getMessage() for r in caplog.records]
    assert "Skipped an unreadable training image: x.png" in shown and "open_clip chatter" not in shown


def test_package_exports_what_the_readme_documents():
    import retriever

    assert sorted(retriever._EXPORTS) + ["__version__"] == retriever.__all__  # the lazy table and __all__ agree
    for name in retriever.__all__:
        assert getattr(retriever, name) is not None, name
    assert {"train", "TrainConfig", "evaluate", "add_to_index"} <= set(retriever.__all__)
