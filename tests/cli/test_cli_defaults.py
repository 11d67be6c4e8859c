"""CLI option defaults are the library's: the commands read them from the config dataclasses (and
the library's keyword defaults), and importing the CLI stays free of torch, faiss and open_clip."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import PurePath

import pytest
import typer.main

from retriever.cli.app import app
from retriever.cli.serve import parse_size
from retriever.demo.run import DemoConfig
from retriever.embed_config import EmbedConfig
from retriever.indexes.config import BuildConfig
from retriever.query import Query
from retriever.serve.config import ServeConfig
from retriever.training.config import OptimConfig, TrainConfig

COMMANDS = typer.main.get_command(app).commands

# The dataclasses whose fields a command's options are.
CONFIGS = {
    "train": (TrainConfig, OptimConfig),
    "embed": (EmbedConfig,),
    "index": (BuildConfig,),
    "search": (Query,),
    "serve": (ServeConfig,),
    "demo": (DemoConfig,),
}
# Options whose name or form differs from the field: (command, option) → (field, CLI value → field value).
RENAMED = {
    ("train", "no_augment"): ("augment", lambda v: not v),
    ("train", "grad_clip"): ("grad_clip", lambda v: v or None),
    ("train", "caption_template"): ("caption_templates", list),
    ("index", "gpu"): ("use_gpu", lambda v: v),
    ("serve", "no_batching"): ("batching", lambda v: not v),
    ("serve", "max_upload"): ("max_upload", parse_size),
}
# Same name, deliberately None on the command line: "the library's default", which needs torch to
# know (is there a GPU?), so the CLI asks `data.loading.default_workers()` when it runs.
CLI_ASKS_LATER = {("train", "workers"), ("demo", "workers")}


def _default(command: str, option: str):
    (param,) = [p for p in COMMANDS[command].params if p.name == option]
    value = getattr(param.default, "value", param.default)  # an Enum choice → its value
    return str(value) if isinstance(value, PurePath) else value  # config fields hold paths as text


def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING and f.name != "num_workers":  # needs torch
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_option_defaults_are_the_config_dataclass_defaults(command):
    fields = {}
    for cls in CONFIGS[command]:
        fields.update(_field_defaults(cls))
    compared = []
    for param in COMMANDS[command].params:
        key = (command, param.name)
        if key in CLI_ASKS_LATER:
            assert _default(*key) is None
            continue
        name, to_field = RENAMED.get(key, (param.name, lambda v: v))
        if name not in fields:
            continue
        cli = _default(*key)
        assert to_field(list(cli) if isinstance(cli, tuple) else cli) == fields[name], (
            f"retriever {command} --{param.name.replace('_', '-')} defaults to {cli!r}; "
            f"{'/'.join(c.__name__ for c in CONFIGS[command])}.{name} to {fields[name]!r}"
        )
        compared.append(name)
    # Enough of the options were compared that a drift would show (not a vacuous pass).
    assert len(compared) >= 5, compared


def test_option_defaults_match_the_library_functions_keyword_defaults():
    """Commands that call a function rather than fill a dataclass: their defaults are its keywords."""
    from retriever.dedup import find_duplicates
    from retriever.evaluation import evaluate
    from retriever.info import folder_info
    from retriever.interop.clip_retrieval import import_clip_retrieval
    from retriever.search import Retriever

    pairs = [
        (("eval", "batch_size"), evaluate, "batch_size"),
        (("dedup", "threshold"), find_duplicates, "threshold"),
        (("dedup", "nprobe"), find_duplicates, "nprobe"),
        (("dedup", "modality"), find_duplicates, "modality"),
        (("import", "dtype"), import_clip_retrieval, "dtype"),
        (("info", "check"), folder_info, "check"),
        (("search", "backend"), Retriever, "backend"),
        (("search", "max_pixels"), Retriever, "max_pixels"),
        (("import", "overwrite"), import_clip_retrieval, "overwrite"),
        (("import", "wait"), import_clip_retrieval, "wait"),
    ]
    for key, fn, keyword in pairs:
        assert _default(*key) == inspect.signature(fn).parameters[keyword].default, (key, fn.__name__)


@pytest.mark.parametrize(
    "code",
    [
        "import retriever.cli.app",
        "import retriever.embed_config, retriever.indexes.config, retriever.serve.config, retriever.training.config",
        "from retriever import EmbedConfig, BuildConfig, TrainConfig, OptimConfig, Query",
    ],
)
def test_cli_and_config_imports_are_light(code):
    """The CLI reads its defaults at import: the config modules must not pull in the heavy libraries."""
    heavy = ("torch", "faiss", "open_clip", "fastapi")
    probe = f"import sys\n{code}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
