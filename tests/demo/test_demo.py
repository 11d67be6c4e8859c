"""A reduced `retriever demo` (200 emoji, 5 epochs) end to end: real towers, real data, offline."""

import json
import os

import pytest
from typer.testing import CliRunner

from retriever.cli.app import app
from retriever.demo.run import DemoConfig, run_demo
from retriever.search import Retriever

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("demo").resolve()
    # A relative --workspace, as the README's `retriever demo` (default ./retriever-demo) gives:
    # the workspace's own pictures must still be found from the manifests that name them.
    cwd = os.getcwd()
    os.chdir(ws.parent)
    try:
        args = ["demo", "--workspace", ws.name, "--limit", "200", "--epochs", "5", "--workers", "2"]
        res = CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    assert "Skipped" not in res.output
    return ws, res.stdout


def test_reduced_demo_tunes_reports_and_indexes(demo_ws):
    ws, stdout = demo_ws
    report = json.loads((ws / "report.json").read_text())
    counts = (report["images"], report["train_images"], report["val_images"], report["heldout_images"])
    assert counts == (200, 136, 24, 40)
    # Validation is carved out of the training concepts: no held-out emoji chooses anything.
    heldout = {json.loads(line)["image"] for line in (ws / "data" / "heldout.jsonl").open()}
    for name in ("train", "val"):
        chosen_on = {json.loads(line)["image"] for line in (ws / "data" / f"{name}.jsonl").open()}
        assert not chosen_on & heldout
    # The training emoji are also drawn in OpenMoji's style (rows of their own, same captions);
    # validation and held-out emoji are not, except the held-out drawings that only measure.
    train_rows = [json.loads(line) for line in (ws / "data" / "train.jsonl").open()]
    drawn = [r for r in train_rows if "/data/openmoji/" in r["image"]]
    assert len(drawn) == len(train_rows) - 136 == 136
    assert sorted(map(tuple, (r["caption"] for r in drawn))) == sorted(
        tuple(r["caption"]) for r in train_rows if r not in drawn
    )
    styled = report["heldout_styles"]["openmoji"]
    assert styled["images"] == 40 and styled["after"]["t2i_R@10"] > styled["before"]["t2i_R@10"]
    assert "drawn in openmoji's style" in stdout
    # Validation chose the epoch count; the final model was refit on train + validation (both
    # styles) for that many epochs, from the same starting heads, and is the one measured.
    assert report["refit"] and report["model"] == f"local-dir:{ws / 'refit' / 'best'}"
    refit_rows = [json.loads(line) for line in (ws / "data" / "train+val.jsonl").open()]
    assert len(refit_rows) == 2 * (136 + 24)
    assert not {r["image"] for r in refit_rows} & heldout
    refit_history = json.loads((ws / "refit" / "metrics.json").read_text())["history"]
    assert max(h["epoch"] for h in refit_history) == report["best_epoch"]
    # Validation chose the querybank temperature (or none); the refit repeats that choice, and
    # its index and its reported figures rank with the refit's own bank.
    tau = json.loads((ws / "run" / "metrics.json").read_text())["querybank"]["tau"]
    refit_setting = json.loads((ws / "refit" / "run.json").read_text())["querybank"]
    assert refit_setting == (repr(tau) if tau is not None else "off")
    assert ((ws / "index" / "querybank.safetensors").is_file()) == (tau is not None)
    assert report["after"].get("querybank_tau") == tau
    if tau is not None:
        assert set(report["after"]["plain"]) >= {"t2i_R@10", "i2t_R@10"}
        assert "querybank normalisation (tau" in stdout
    # Untrained heads are near chance on 40 held-out emoji; tuned heads are far above it.
    assert report["before"]["t2i_R@5"] < 0.3
    assert report["after"]["t2i_R@5"] > report["before"]["t2i_R@5"] + 0.2
    assert "Held-out text→image R@5" in stdout and "untrained heads" in stdout and "validation emoji" in stdout
    assert f"retriever serve {ws / 'index'}" in stdout
    r = Retriever(ws / "index")
    assert r.manifest.indexes["image"].count == 200
    assert r.identity.name == report["model"]
    # The tuned model was exported (verified against torch) and queries run on it, torch-free.
    export = json.loads((ws / "refit" / "best" / "onnx" / "export.json").read_text())
    assert export["text"]["tokenizer"]["kind"] == "hf"
    assert max(export["verified"]["text_max_abs_diff"], export["verified"]["image_max_abs_diff"]) <= 1e-5
    assert r.search(text="a red heart", k=3) and r.query_encoder.backend == "onnx"


def test_rerun_reuses_the_finished_work(demo_ws):
    ws, _ = demo_ws
    models = [ws / run / "best" / "open_clip_model.safetensors" for run in ("run", "refit")]
    before = [m.stat().st_mtime_ns for m in models]
    result = run_demo(DemoConfig(workspace=str(ws), limit=200, epochs=5, workers=0))
    assert result.seconds["train"] < 5 and result.seconds["refit"] < 5  # no retraining, no refit
    assert [m.stat().st_mtime_ns for m in models] == before


def test_the_printed_serve_command_serves_the_page_and_the_api(demo_ws):
    from fastapi.testclient import TestClient

    from retriever.cli.serve import parse_index_spec
    from retriever.serve.app import ServeConfig, create_app

    ws, _ = demo_ws
    with TestClient(create_app(ServeConfig(indexes=[parse_index_spec(str(ws / "index"))], watch_seconds=0))) as c:
        assert "<title>retriever</title>" in c.get("/").text
        hits = c.post("/v1/search", json={"text": "a yellow star", "k": 5}).json()["hits"]
        assert len(hits) == 5 and c.get(hits[0]["thumbnail_url"]).status_code == 200


def test_small_training_sets_get_more_steps_per_epoch(tmp_path):
    """The default recipe keeps 5 optimizer steps per epoch on small sets (Font Awesome's 511 icons
    would otherwise fill 1 step of 256 per epoch); larger sets (the 1,301 emoji) keep batches of 256."""
    from retriever.demo.run import demo_batch_size, demo_train_config

    cfg = DemoConfig()
    assert [demo_batch_size(cfg, n) for n in (4096, 1301, 511, 10)] == [256, 256, 102, 2]
    tcfg = demo_train_config(
        cfg,
        source=tmp_path / "train.jsonl",
        val=tmp_path / "val.jsonl",
        out=tmp_path / "run",
        feature_cache=tmp_path / "features",
        n_train=511,
        workers=0,
        epochs=30,
        seed=0,
        model="local-dir:somewhere",
    )
    assert tcfg.batch_size == 102 and tcfg.cache_features


def test_reduced_font_awesome_fine_tune_reuses_the_demo_and_lifts_recall(demo_ws):
    """`retriever demo --domain fontawesome` on the reduced demo (README's second-domain command,
    with --limit): the emoji demo is reused, 200 icons are split by concept, the demo model is
    fine-tuned and refit, and held-out recall of the tuned model is above the demo model's."""
    ws, _ = demo_ws
    emoji_model = (ws / "refit" / "best" / "open_clip_model.safetensors").stat().st_mtime_ns
    args = ["demo", "--workspace", str(ws), "--limit", "200", "--epochs", "5", "--workers", "0"]
    res = CliRunner().invoke(app, [*args, "--domain", "fontawesome"])
    assert res.exit_code == 0, res.output
    assert (ws / "refit" / "best" / "open_clip_model.safetensors").stat().st_mtime_ns == emoji_model

    folder = ws / "fontawesome"
    report = json.loads((folder / "report.json").read_text())
    assert (report["train_images"], report["val_images"], report["heldout_images"]) == (102, 18, 80)
    heldout = {json.loads(line)["image"] for line in (folder / "heldout.jsonl").open()}
    for name in ("train", "val", "train+val"):
        assert not {json.loads(line)["image"] for line in (folder / f"{name}.jsonl").open()} & heldout
    assert report["base_model"] == f"local-dir:{ws / 'refit' / 'best'}"
    assert report["refit"] and report["model"] == f"local-dir:{folder / 'refit' / 'best'}"
    # The refit found every training and validation icon's tower outputs in the shared cache.
    assert "120 of them were in the feature cache; the towers ran on 0" in res.output
    assert report["after"]["t2i_R@10"] > report["before"]["t2i_R@10"]
    assert report["after"]["i2t_R@10"] > report["before"]["i2t_R@10"]
    assert "Held-out R@10 lift" in res.stdout


def test_a_rerun_with_other_settings_is_refused_not_reported_as_this_recipe(demo_ws):
    """A finished demo trained with other settings (here --epochs) is not reused and reported as
    this run's model: one sentence says which settings differ and what to do."""
    ws, _ = demo_ws
    args = ["demo", "--workspace", str(ws), "--limit", "200", "--epochs", "4", "--workers", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    assert "other settings (epochs)" in res.output and "choose a new --workspace" in res.output
    assert "Traceback" not in res.output
