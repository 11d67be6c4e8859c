"""Head-training ablations for the offline demo model, on tower outputs cached by quality_features.py.

Protocol (issue 14): the demo's 383 held-out Twemoji concepts (`split_by_concept(items, 0.2, 0)`)
are never used for a choice. A validation split is carved, by concept and seeded, out of the
training concepts (`split_by_concept(train, VAL_FRACTION, 1)`); every choice (epoch, recipe) is
made by validation mean recall, and held-out recall is computed once per run, at the epoch chosen
on validation. Evaluation captions are always the plain names and aliases (no templates), the
gallery being the split's own concepts, exactly as `retriever demo` reports.

Each run trains the two heads and the temperature on the cached features (what
`retriever train --cache-features` trains) and is recorded in JSON: config, seed, best epoch,
validation and held-out recall, seconds.

    PYTHONPATH=$PWD python benchmarks/quality_ablation.py --features bench-out/quality \
        --json bench-out/quality-ablation.json --grid baseline
    python benchmarks/quality_ablation.py --table-from bench-out/quality-ablation.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VAL_FRACTION = 0.15
KEYS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")


@dataclass
class Recipe:
    name: str = "today"
    stages: tuple[str, ...] = ("head",)
    views: int = 1  # training views per image: the eval view plus views-1 augmented ones
    tta: int = 1  # eval image embedding = mean over this many views (1: the eval view only)
    templates: tuple[str, ...] = ("{}",)  # training captions: every caption under every template
    query_ensemble: tuple[str, ...] = ("{}",)  # eval texts: mean embedding over these templates
    head: str = "linear"  # linear | mlp (open_clip's timm_proj / hf_proj_type shapes)
    drop: float = 0.0  # dropout before the image head (open_clip's timm_drop)
    standardize: bool = False  # z-score tower features with training statistics
    embed_dim: int = 512
    temp_init: float = 0.07
    learn_temp: bool = True
    loss: str = "infonce"
    lr: float = 1e-3
    weight_decay: float = 0.1
    epochs: int = 30
    batch_size: int = 256
    warmup: float = 0.05
    seed: int = 0
    min_steps_per_epoch: int = 0  # > 0: batch = min(batch_size, n_train // this): small sets get more steps
    min_steps: int = 0  # > 0: at least this many optimizer steps (epochs scaled up to reach it)
    unlock: int = 0  # > 0: also train the trunk's last block + conv_head on cached stage-5 maps
    trunk_lr: float | None = None  # lr of the unlocked trunk block (None: lr)
    bn_train: bool = True  # unlocked BatchNorms use batch statistics (as a partly unlocked trunk does)
    hard_clusters: int = 0  # > 0: batches of similar concepts (k-means over caption features, Robinson et al.)
    init: str | None = None  # "emoji": start from the heads trained on the emoji cache (--init-features)
    refit: bool = False  # after choosing the epoch on val, retrain on train+val for that many epochs
    old_protocol: bool = False  # today's demo before issue 14: train on train+val, pick the epoch on held-out
    unlock_text: int = 0  # 1: also train MiniLM's last layer on cached hidden states (plain captions)
    colour_weight: float = 1.0  # scale of the "colour" stage (hand-made colour histogram) against the others
    style_rows: bool = False  # OpenMoji drawings of the training concepts as rows of their own
    style_rows_fraction: float = 1.0  # ... for this share of the training concepts (seeded)
    style: float = 0.0  # > 0: a training image is the OpenMoji drawing of the concept with this probability
    querybank: float = 0.0  # > 0: score with an inverted softmax over the training split (QB-Norm), this temperature
    extra_per_epoch: float = 0.0  # > 0: each epoch draws this many extra rows per own row (seeded), not all of them
    extra_rows: str = ""  # --extra-features rows in every training set: "all" | "clean" (no held-out names) | "novel"


@dataclass
class Run:
    recipe: dict
    best_epoch: int
    val: dict
    heldout: dict
    seconds: float
    history: list = field(default_factory=list)
    before: dict | None = None  # with init: held-out recall of the starting heads
    heldout_style: dict | None = None  # with --style-features: held-out concepts drawn in OpenMoji's style
    heldout_test_style: dict | None = None  # with --test-style-features: held-out concepts that style draws
    cv: list | None = None  # with --folds K: validation mean recall of each fold (K-fold over train+val)
    cv_style: list | None = None  # ... and of the folds' validation concepts drawn by OpenMoji
    cv_without_refit: list | None = None  # refit recipes: the same nested folds, scored before the refit
    heldout_probe: dict | None = None  # with --probe-features: that domain's held-out split, these heads as they are
    extra: dict | None = None  # with extra_rows: the extra caches and how many of their rows trained


# ----------------------------------------------------------------------------------------------


class Data:
    def __init__(self, folder: Path, style: Path | None = None, test_style: Path | None = None):
        from safetensors.torch import load_file

        from retriever.demo.emoji import EmojiImage, split_by_concept

        meta = json.loads((folder / "features.json").read_text())
        self.tensors = load_file(str(folder / "text.safetensors"))
        views = []
        for v in range(64):
            if not (folder / f"view{v}.safetensors").is_file():
                break
            views.append(load_file(str(folder / f"view{v}.safetensors")))
        for stage in meta["stages"]:
            self.tensors[f"image_{stage}"] = torch.stack([v[stage] for v in views], dim=1)  # (N, V, C)
        self.views = len(views)
        if (folder / "colour.safetensors").is_file():  # hand-made colour histograms of the eval view
            col = load_file(str(folder / "colour.safetensors"))["colour"]
            self.tensors["image_colour"] = col[:, None].expand(-1, len(views), -1)
        # Other styles of the same items, in the same order (quality_features --domain openmoji |
        # symbola), each appended as one more view: OpenMoji to train on, Symbola to measure only.
        self.style_view = self._append_style(style, meta)[0] if style is not None else None
        self.test_view, self.test_present = None, None
        if test_style is not None:
            self.test_view, tmeta = self._append_style(test_style, meta)
            self.test_present = tmeta.get("present") or [True] * len(meta["items"])
        self.items = [EmojiImage(d["char"], d["path"], tuple(d["captions"])) for d in meta["items"]]
        self.row = {s: i for i, s in enumerate(meta["strings"])}
        index = {it.path: i for i, it in enumerate(self.items)}
        self.folder = folder
        self.domain = meta.get("domain", "emoji")
        heldout_fraction = 0.4 if self.domain == "fontawesome" else 0.2  # as run_domain_demo / retriever demo
        train_all, heldout = split_by_concept(self.items, heldout_fraction, 0)
        train, val = split_by_concept(train_all, VAL_FRACTION, 1)
        self.splits = {
            "train": [index[it.path] for it in train],
            "val": [index[it.path] for it in val],
            "heldout": [index[it.path] for it in heldout],
            "train+val": [index[it.path] for it in train_all],
        }
        self.n_own = len(self.items)
        self.extra: dict[str, list[int]] = {"all": [], "clean": [], "novel": [], "clean-probe": []}
        self.extra_folders: list[str] = []

    def add_extra(self, folder: Path, probe: Data | None = None) -> None:
        """Append another cache's items (other concepts: quality_features --domain mdi | ...) as
        extra training rows. They join no split: `_fit` adds them to every training set (and to the
        refit's), never to a validation fold or a held-out score. Their eval view fills every view
        slot; text rows of captions not yet cached are appended to the text features."""
        from safetensors.torch import load_file

        from retriever.demo.emoji import EmojiImage

        meta = json.loads((folder / "features.json").read_text())
        assert meta["templates"] == ["{}"], "extra rows: plain captions only (quality_features --plain-text)"
        text = load_file(str(folder / "text.safetensors"))["text"]
        new = [i for i, t in enumerate(meta["strings"]) if t not in self.row]
        for j, i in enumerate(new):
            self.row[meta["strings"][i]] = len(self.tensors["text"]) + j
        self.tensors["text"] = torch.cat([self.tensors["text"], text[new]])
        view = load_file(str(folder / "view0.safetensors"))
        n = self.tensors["image_head"].shape[1]
        for key in [k for k in self.tensors if k.startswith("image_")]:
            stage = key[len("image_") :]
            x = view[stage] if stage in view else torch.zeros(len(meta["items"]), self.tensors[key].shape[-1])
            self.tensors[key] = torch.cat([self.tensors[key], x[:, None].expand(-1, n, -1)])
        start = len(self.items)
        self.items += [EmojiImage(d["char"], d["path"], tuple(d["captions"])) for d in meta["items"]]
        heldout = {_norm(c) for i in self.splits["heldout"] for c in self.items[i].captions}
        every = {_norm(c) for i in range(self.n_own) for c in self.items[i].captions}
        probed = {_norm(c) for i in probe.splits["heldout"] for c in probe.items[i].captions} if probe else set()
        for i in range(start, len(self.items)):
            caps = {_norm(c) for c in self.items[i].captions}
            self.extra["all"].append(i)
            if not caps & heldout:
                self.extra["clean"].append(i)
            if not caps & every:
                self.extra["novel"].append(i)
            if not caps & (heldout | probed):  # nor a held-out name of --probe-features' domain
                self.extra["clean-probe"].append(i)
        self.extra_folders.append(str(folder))

    def maps(self, views: int) -> torch.Tensor:  # (N, V, 192, 7, 7) fp16 stage-5 maps
        from safetensors.torch import load_file

        if not hasattr(self, "_maps") or self._maps.shape[1] < views:
            self._maps = torch.stack(
                [load_file(str(self.folder / f"maps{v}.safetensors"))["map5"] for v in range(views)], dim=1
            )
        return self._maps

    def _append_style(self, folder: Path, meta: dict) -> tuple[int, dict]:
        """Append `folder`'s eval view (and colour histogram) as one more view; (its index, its meta)."""
        from safetensors.torch import load_file

        smeta = json.loads((folder / "features.json").read_text())
        assert [d["char"] for d in smeta["items"]] == [d["char"] for d in meta["items"]]
        extra = load_file(str(folder / "view0.safetensors"))
        if (folder / "colour.safetensors").is_file():
            extra["colour"] = load_file(str(folder / "colour.safetensors"))["colour"]
        for stage in [*meta["stages"], "colour"]:
            key = f"image_{stage}"
            if key in self.tensors:
                self.tensors[key] = torch.cat([self.tensors[key], extra[stage][:, None]], dim=1)
        return self.tensors["image_head"].shape[1] - 1, smeta

    def text_input(self, rows, norm):
        """(hidden states, mask) of text rows, for a recipe that trains MiniLM's last layer."""
        from safetensors.torch import load_file

        if not hasattr(self, "_hidden"):
            plain = json.loads((self.folder / "text_hidden.json").read_text())
            t = load_file(str(self.folder / "text_hidden.safetensors"))
            at = {s: i for i, s in enumerate(plain)}
            strings = sorted(self.row, key=self.row.get)
            self._hrow = torch.tensor([at.get(s, -1) for s in strings])
            self._hidden = t["hidden"]
            self._mask = t["mask"]
        h = self._hrow[torch.as_tensor(rows)]
        assert (h >= 0).all(), "unlock_text trains on plain captions only (no templates)"
        return self._hidden[h], self._mask[h]

    def image(self, stages, colour_weight: float = 1.0) -> torch.Tensor:  # (N, V, C)
        return torch.cat([self.tensors[f"image_{s}"] * (colour_weight if s == "colour" else 1) for s in stages], dim=-1)

    def text_rows(self, idx: list[int], templates) -> tuple[list[list[int]], list[int]]:
        """Per item, the text rows of its captions under the templates; and the plain rows in order."""
        per_item = [[self.row[t.format(c)] for c in self.items[i].captions for t in templates] for i in idx]
        return per_item


def _norm(caption: str) -> str:
    """Lower case, punctuation / hyphens / underscores as spaces: the leakage check's caption key."""
    import re

    return " ".join(re.sub(r"[\W_]+", " ", caption.lower()).split())


_TRUNK = []


def _trunk():
    """The pretrained EfficientNet-Lite0 trunk of the demo's composed model (loaded once)."""
    if not _TRUNK:
        from retriever.models.load import load_model

        _TRUNK.append(load_model(f"local-dir:{_INIT}", device="cpu", precision="fp32").model.visual.trunk.eval())
    return _TRUNK[0]


_INIT = Path("bench-out/quality/init")


class Heads(nn.Module):
    def __init__(self, d_img: int, d_txt: int, r: Recipe):
        super().__init__()
        e = r.embed_dim
        if r.head == "linear":
            self.image = nn.Sequential(nn.Dropout(r.drop), nn.Linear(d_img, e, bias=False))
            self.text = nn.Linear(d_txt, e, bias=False)
        else:  # open_clip's shapes: timm Mlp(in, 2e, e) and HF Linear-GELU-Linear with (d+e)//2 hidden
            self.image = nn.Sequential(
                nn.Linear(d_img, 2 * e), nn.GELU(), nn.Dropout(r.drop), nn.Linear(2 * e, e, bias=False)
            )
            h = (d_txt + e) // 2
            self.text = nn.Sequential(nn.Linear(d_txt, h, bias=False), nn.GELU(), nn.Linear(h, e, bias=False))
        self.tail = None
        self.text_tail = None
        if r.unlock_text:  # MiniLM's last layer, trained on the cached hidden states entering it
            from retriever.models.load import load_model

            bert = load_model(f"local-dir:{_INIT}", device="cpu", precision="fp32").model.text.transformer
            self.text_tail = copy.deepcopy(bert.encoder.layer[-1]).train()
        if r.unlock:  # the trunk's last `unlock` blocks + conv_head + bn2, from the pretrained trunk
            trunk = _trunk()
            blocks = [b for stage in trunk.blocks for b in stage][-r.unlock :]
            self.tail = copy.deepcopy(nn.Sequential(*blocks, trunk.conv_head, trunk.bn2))
        init = math.log(1 / r.temp_init)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=r.learn_temp)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if r.loss == "siglip" else None

    def enc_image(self, x):
        if self.tail is not None:  # x: stage-5 maps (..., 192, 7, 7) -> pooled 1280-d trunk output
            lead = x.shape[:-3]
            x = self.tail(x.reshape(-1, *x.shape[-3:]).float()).mean(dim=(2, 3)).reshape(*lead, -1)
        return F.normalize(self.image(x), dim=-1)

    def enc_text(self, x):
        if self.text_tail is not None:  # x: (hidden states entering the last layer, attention mask)
            hid, mask = x
            ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            y = self.text_tail(hid.float(), attention_mask=ext)
            y = y[0] if isinstance(y, tuple) else y
            x = (y * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(self.text(x), dim=-1)


def _loss(heads: Heads, img, txt, kind: str, positives: torch.Tensor | None = None):
    logits = heads.logit_scale.exp() * img @ txt.T
    if kind == "infonce-multi":  # every pair in `positives` is a match, not only the diagonal
        assert positives is not None

        def multi(lg):  # -log of the softmax mass on the row's matches
            return (torch.logsumexp(lg, dim=1) - torch.logsumexp(lg.masked_fill(~positives, -1e9), dim=1)).mean()

        return (multi(logits) + multi(logits.T)) / 2
    if kind == "infonce":
        labels = torch.arange(len(img))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    logits = logits + heads.logit_bias
    labels = 2 * torch.eye(len(img)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


def _optimizer(heads: Heads, r: Recipe):
    groups = []
    for tail in (False, True):
        named = [
            (n, p)
            for n, p in heads.named_parameters()
            if p.requires_grad and n.startswith(("tail.", "text_tail.")) == tail
        ]
        lr = (r.trunk_lr or r.lr) if tail else r.lr
        decay = [p for n, p in named if p.ndim >= 2]
        keep = [p for n, p in named if p.ndim < 2]
        groups += [
            {"params": keep, "weight_decay": 0.0, "base": lr},
            {"params": decay, "weight_decay": r.weight_decay, "base": lr},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=r.lr, betas=(0.9, 0.98), eps=1e-6)


def _lr(step, base, warmup, total):  # retriever.training.optim.lr_at
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * base * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(heads: Heads, data: Data, idx: list[int], image: torch.Tensor, r: Recipe, norm) -> dict:
    from retriever.metrics import retrieval_metrics

    img, emb, text_image = embed_split(heads, data, idx, image, r, norm)
    if r.querybank:
        out = _querybank_metrics(heads, data, img, emb, text_image, image, r, norm)
    else:
        out = retrieval_metrics(img, emb, text_image).flat()
    _train_mode(heads, r)
    return out


@torch.no_grad()
def embed_split(heads: Heads, data: Data, idx: list[int], image: torch.Tensor, r: Recipe, norm):
    """(image embeddings, caption embeddings, caption -> image position) of the items `idx`, the
    heads in eval mode (the caller puts them back)."""
    heads.eval()
    x = data.maps(r.tta)[idx, : r.tta] if r.unlock else norm(image[idx, : r.tta])  # (n, tta, C) or maps
    img = F.normalize(torch.cat([heads.enc_image(c) for c in x.split(128)]).mean(dim=1), dim=-1)
    rows, text_image = [], []
    for j, i in enumerate(idx):
        for c in data.items[i].captions:
            rows.append([data.row[t.format(c)] for t in r.query_ensemble])
            text_image.append(j)
    rows_t = torch.tensor(rows)  # (captions, templates)
    feats = data.text_input(rows_t.flatten(), norm) if r.unlock_text else norm(data.tensors["text"][rows_t.flatten()])
    emb = heads.enc_text(feats).reshape(rows_t.shape[0], rows_t.shape[1], -1).mean(dim=1)
    return img, F.normalize(emb, dim=-1), text_image


def _querybank_metrics(heads: Heads, data: Data, img, emb, text_image, image, r: Recipe, norm) -> dict:
    """Recall with querybank normalisation (Bogolin et al. 2022, inverted softmax; the product's
    `retriever.querybank`): a gallery item's score is divided by its summed exp-similarity
    (temperature `r.querybank`) to a bank of queries of the other modality, here the training
    split's captions and (eval-view) images, so items that are near every query (hubs) rank lower."""
    from retriever.metrics import retrieval_metrics
    from retriever.querybank import QueryBank

    assert not (r.unlock or r.unlock_text), "querybank scores the heads-only recipes"
    bank = data.splits["train+val" if (r.refit or r.old_protocol) else "train"]
    bank_img = F.normalize(heads.enc_image(norm(image[bank, 0])), dim=-1)
    rows = [data.row[c] for i in bank for c in data.items[i].captions]
    bank_txt = F.normalize(heads.enc_text(norm(data.tensors["text"][rows])), dim=-1)
    qb = QueryBank(bank_txt.numpy(), bank_img.numpy(), r.querybank, "")
    return retrieval_metrics(img, emb, text_image, querybank=qb).flat()


def _train_mode(heads: Heads, r: Recipe) -> None:
    heads.train()
    if heads.tail is not None and not r.bn_train:
        for m in heads.tail.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 20) -> torch.Tensor | None:
    """Cluster ids of the rows of x (cosine k-means, seeded); None for k = 0."""
    if not k:
        return None
    x = F.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]]
    for _ in range(iters):
        ids = (x @ centres.T).argmax(dim=1)
        for c in range(k):
            if (ids == c).any():
                centres[c] = F.normalize(x[ids == c].mean(0), dim=-1)
    return ids


def train_recipe(data: Data, r: Recipe, folds: int = 0) -> Run:
    """One run on the standard split (what the held-out figures come from), plus K-fold scores.

    With `folds`, the 1,531 non-held-out concepts are cut into K seeded folds; each fold in turn is
    the validation set of a run trained on the others. The mean of the folds' validation scores is
    a steadier selection signal than the one 230-concept split (every concept validates once).
    """
    if r.refit and not r.epochs:  # epochs 0: take the count the same recipe chooses on validation
        chosen = _fit(data, replace(r, refit=False, epochs=Recipe.epochs))[0].best_epoch
        run = _fit(data, replace(r, epochs=chosen))[0]
        if folds:
            run.cv, run.cv_without_refit, run.cv_style = _refit_folds(data, r, folds)
        return run
    run = _fit(data, r)[0]
    if folds:
        pool = list(data.splits["train+val"])
        random.Random(7).shuffle(pool)
        standard = dict(data.splits)
        scores, style_scores = [], []
        try:
            for f in range(folds):
                val = set(pool[f::folds])
                data.splits = {**standard, "train": [i for i in pool if i not in val], "val": sorted(val)}
                fold = _fit(data, r, heldout=False)[0]
                scores.append(round(fold.val["mean_recall"], 4))
                if fold.heldout_style:
                    style_scores.append(round(fold.heldout_style["mean_recall"], 4))
        finally:
            data.splits = standard
        run.cv = scores
        run.cv_style = style_scores or None
    return run


def _refit_folds(data: Data, r: Recipe, folds: int) -> tuple[list, list, list | None]:
    """Nested K-fold check of refitting, held-out concepts untouched: per fold, the recipe chooses
    its epoch on an inner validation split of the other folds; the model of that epoch, and a
    refit on all the other folds for that many epochs, are both scored on the fold (and the refit
    on the fold's concepts drawn by OpenMoji, with --style-features)."""
    assert not r.standardize, "nested refit folds score unstandardised features only"
    pool = list(data.splits["train+val"])
    random.Random(7).shuffle(pool)
    standard = dict(data.splits)
    image = data.image(r.stages, r.colour_weight)
    with_refit, without, style = [], [], []
    try:
        for f in range(folds):
            fold = sorted(set(pool[f::folds]))
            rest = [i for i in pool if i not in set(fold)]
            inner = set(rest[: int(round(VAL_FRACTION * len(rest)))])
            data.splits = {
                **standard,
                "train": [i for i in rest if i not in inner],
                "val": sorted(inner),
                "train+val": rest,
            }
            chosen, heads = _fit(data, replace(r, refit=False, epochs=Recipe.epochs), heldout=False)
            without.append(round(evaluate(heads, data, fold, image, r, _identity)["mean_recall"], 4))
            _, refit = _fit(data, replace(r, epochs=chosen.best_epoch), heldout=False)
            with_refit.append(round(evaluate(refit, data, fold, image, r, _identity)["mean_recall"], 4))
            if data.style_view is not None:
                sv = data.style_view
                one = replace(r, tta=1)
                style.append(
                    round(evaluate(refit, data, fold, image[:, sv : sv + 1], one, _identity)["mean_recall"], 4)
                )
    finally:
        data.splits = standard
    return with_refit, without, style or None


def _identity(x):
    return x


def _train_heads(data: Data, r: Recipe) -> Heads:
    return _fit(data, r)[1]


def _fit(data: Data, r: Recipe, heldout: bool = True) -> tuple[Run, Heads]:
    t0 = time.perf_counter()
    torch.manual_seed(r.seed)
    image = data.image(r.stages, r.colour_weight)
    text = data.tensors["text"]
    train_idx = data.splits["train+val" if (r.refit or r.old_protocol) else "train"]
    select_on = data.splits["heldout" if r.old_protocol else "val"]
    if r.standardize:
        flat = image[train_idx, : r.views].reshape(-1, image.shape[-1])
        mu_i, sd_i = flat.mean(0), flat.std(0) + 1e-6
        rows = sorted({x for per in data.text_rows(train_idx, r.templates) for x in per})
        mu_t, sd_t = text[rows].mean(0), text[rows].std(0) + 1e-6

        def norm(x):
            return (x - mu_i) / sd_i if x.shape[-1] == image.shape[-1] else (x - mu_t) / sd_t
    else:

        def norm(x):
            return x

    heads = Heads(image.shape[-1], text.shape[-1], r)
    if r.init == "emoji":  # the demo model's heads: trained on the emoji cache with today's recipe
        heads.load_state_dict(_emoji_heads(r), strict=False)
    _train_mode(heads, r)
    opt = _optimizer(heads, r)
    extra = list(data.extra[r.extra_rows]) if r.extra_rows else []
    assert not extra or not (r.unlock or r.unlock_text or r.hard_clusters), "extra rows: cached head features only"
    pool = list(train_idx) + extra  # per_item positions: the split's concepts, then the extra rows
    per_item = data.text_rows(pool, r.templates)
    batch = r.batch_size
    if r.min_steps_per_epoch:
        batch = max(2, min(batch, len(train_idx) // r.min_steps_per_epoch))
    # style_rows: each concept's OpenMoji drawing is a row too (for a seeded share of the concepts)
    styled = list(range(len(train_idx))) if r.style_rows else []
    if r.style_rows_fraction < 1:
        random.Random(r.seed + 99).shuffle(styled)
        styled = styled[: int(round(r.style_rows_fraction * len(train_idx)))]
    n_own, n_styled = len(train_idx), len(styled)
    n_rows = n_own + n_styled + len(extra)  # row positions: own, their OpenMoji drawings, extra rows
    n_drawn = min(len(extra), int(round(r.extra_per_epoch * (n_own + n_styled)))) if r.extra_per_epoch else len(extra)
    steps_per_epoch = (n_own + n_styled + n_drawn) // batch
    epochs = max(r.epochs, math.ceil(r.min_steps / steps_per_epoch)) if r.min_steps else r.epochs
    total = steps_per_epoch * epochs
    warmup = int(round(r.warmup * total))
    rng = random.Random(r.seed)
    maps = data.maps(r.views) if r.unlock else None
    step, best, history = 0, None, []
    clusters = _kmeans(text[[per[0] for per in data.text_rows(train_idx, ("{}",))]], r.hard_clusters, r.seed)
    for epoch in range(1, epochs + 1):
        order = list(range(n_rows))
        if n_drawn < len(extra):  # a fresh seeded draw of extra rows every epoch
            order = order[: n_own + n_styled] + rng.sample(order[n_own + n_styled :], n_drawn)
        rng.shuffle(order)
        if clusters is not None:  # whole clusters in a shuffled order: a batch holds a few groups of look-alikes
            keys = list(range(r.hard_clusters))
            rng.shuffle(keys)
            rank = {k: i for i, k in enumerate(keys)}
            order.sort(key=lambda p: rank[int(clusters[p])])
        for b in range(steps_per_epoch):
            pos = order[b * batch : (b + 1) * batch]
            views = [rng.randrange(r.views) for _ in pos]
            if r.style_rows:
                views = [data.style_view if n_own <= p < n_own + n_styled else v for p, v in zip(pos, views)]
            pos = [styled[p - n_own] if n_own <= p < n_own + n_styled else p for p in pos]
            pos = [p - n_styled if p >= n_own + n_styled else p for p in pos]  # extra rows: after the own
            if r.style:
                assert data.style_view is not None, "style > 0 needs --style-features"
                views = [data.style_view if rng.random() < r.style else v for v in views]
            rows = [rng.choice(per_item[p]) for p in pos]
            sel = [pool[p] for p in pos]
            x_img = maps[sel, views] if maps is not None else norm(image[sel, views])
            x_txt = data.text_input(rows, norm) if r.unlock_text else norm(text[rows])
            for g in opt.param_groups:
                g["lr"] = _lr(step, g["base"], warmup, total)
            positives = None
            if r.loss == "infonce-multi":  # same concept (its two styles) or caption text: a match
                sel_t, rows_t = torch.tensor(sel), torch.tensor(rows)
                positives = (sel_t[:, None] == sel_t[None, :]) | (rows_t[:, None] == rows_t[None, :])
            loss = _loss(heads, heads.enc_image(x_img), heads.enc_text(x_txt), r.loss, positives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in heads.parameters() if p.requires_grad], 1.0)
            opt.step()
            with torch.no_grad():
                heads.logit_scale.clamp_(0, math.log(100))
            step += 1
        if r.refit:
            continue
        val = evaluate(heads, data, select_on, image, r, norm)
        history.append({"epoch": epoch, "mean_recall": round(val["mean_recall"], 4)})
        if VERBOSE:
            print(
                f"  {r.name} epoch {epoch}: val mean {100 * val['mean_recall']:.1f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        if best is None or val["mean_recall"] > best[1]["mean_recall"]:
            best = (epoch, val, copy.deepcopy(heads.state_dict()))
    if r.refit:
        best = (epochs, {}, heads.state_dict())
    heads.load_state_dict(best[2])
    if not heldout:  # a cross-validation fold: only its validation scores are wanted
        fold = Run(asdict(r), best[0], best[1], {}, time.perf_counter() - t0, history)
        if data.style_view is not None and not r.unlock:  # the same validation concepts drawn by OpenMoji
            sv = data.style_view
            fold.heldout_style = evaluate(heads, data, select_on, image[:, sv : sv + 1], replace(r, tta=1), norm)
        return fold, heads
    held = evaluate(heads, data, data.splits["heldout"], image, r, norm)
    run = Run(asdict(r), best[0], best[1], held, time.perf_counter() - t0, history)
    if extra:
        run.extra = {"folders": data.extra_folders, "mode": r.extra_rows, "rows": len(extra)}
    if PROBE is not None and not r.unlock:  # e.g. Font Awesome: these heads' held-out recall before any fine-tune
        run.heldout_probe = evaluate(
            heads, PROBE, PROBE.splits["heldout"], PROBE.image(r.stages), replace(r, tta=1), norm
        )
    if data.style_view is not None and not r.unlock and "image_head" in data.tensors:
        sv = data.style_view
        run.heldout_style = evaluate(
            heads, data, data.splits["heldout"], image[:, sv : sv + 1], replace(r, tta=1), norm
        )
    if data.test_view is not None and not r.unlock:
        tv, present = data.test_view, data.test_present
        idx = [i for i in data.splits["heldout"] if present[i]]
        run.heldout_test_style = evaluate(heads, data, idx, image[:, tv : tv + 1], replace(r, tta=1), norm)
    if r.init == "emoji":  # the starting point on this domain's held-out split: what the lift is over
        start = Heads(image.shape[-1], text.shape[-1], replace(r, unlock=0))
        start.load_state_dict(_emoji_heads(r), strict=False)
        start.eval()
        run.before = evaluate(start, data, data.splits["heldout"], image, replace(r, unlock=0), norm)
    return run, heads


VERBOSE = False
PROBE: Data | None = None  # --probe-features: another domain scored with each run's final heads
_EMOJI: dict = {}
EMOJI_FEATURES = Path("bench-out/quality")
EMOJI_STYLE: Path | None = None  # the OpenMoji cache: the demo heads train on both styles (style_rows)
EMOJI_FINAL = False  # the starting heads are the demo's final model: 1,024-d, refit on train + val


def _emoji_heads(r: Recipe) -> dict:
    """State dict of today's demo heads (seed `r.seed`, epoch chosen on emoji validation)."""
    key = r.seed
    if key not in _EMOJI:
        data = Data(EMOJI_FEATURES, EMOJI_STYLE)
        base = Recipe(seed=r.seed, style_rows=EMOJI_STYLE is not None)  # the demo's recipe
        if EMOJI_FINAL:  # as `retriever demo` now: the epoch count chosen on validation, then the refit
            base = replace(base, embed_dim=1024)
            chosen = _fit(data, base)[0].best_epoch
            base = replace(base, refit=True, epochs=chosen)
        heads = _train_heads(data, base)
        _EMOJI[key] = {k: v for k, v in heads.state_dict().items()}
    return _EMOJI[key]


# ----------------------------------------------------------------------------------------------

from quality_features import TEMPLATES as TEMPLATES8  # noqa: E402 (the one list; run from benchmarks/)


def grid(name: str) -> list[Recipe]:
    base = Recipe()
    if name == "baseline":
        old = replace(base, name="today, old protocol (epoch picked on held-out)", old_protocol=True)
        return [old, *[replace(base, seed=s) for s in (0, 1, 2)]]
    if name == "single":  # one change at a time from today's recipe, seed 0
        t8 = dict(templates=TEMPLATES8)
        return [
            replace(base, name="+templates (train)", **t8),
            replace(base, name="+templates (train) +query ensemble", **t8, query_ensemble=TEMPLATES8),
            replace(base, name="+query ensemble only", query_ensemble=TEMPLATES8),
            replace(base, name="mlp heads", head="mlp"),
            replace(base, name="embed 256", embed_dim=256),
            replace(base, name="embed 1024", embed_dim=1024),
            replace(base, name="temp init 0.03", temp_init=0.03),
            replace(base, name="temp init 0.2", temp_init=0.2),
            replace(base, name="temp fixed 0.05", temp_init=0.05, learn_temp=False),
            replace(base, name="siglip", loss="siglip", temp_init=0.1),
            replace(base, name="lr 3e-4", lr=3e-4),
            replace(base, name="lr 3e-3", lr=3e-3),
            replace(base, name="epochs 60", epochs=60),
            replace(base, name="wd 0", weight_decay=0.0),
            replace(base, name="wd 1.0", weight_decay=1.0),
            replace(base, name="batch 128", batch_size=128),
            replace(base, name="drop 0.2 (image)", drop=0.2),
            replace(base, name="standardize", standardize=True),
            replace(base, name="stages block6+head", stages=("block6", "head")),
            replace(base, name="stages 4-6+head", stages=("block4", "block5", "block6", "head")),
            replace(
                base,
                name="stages 4-6+head, standardize",
                stages=("block4", "block5", "block6", "head"),
                standardize=True,
            ),
        ]
    if name == "quick":  # the one-factor changes that map onto open_clip configs / TrainConfig options
        return [
            replace(base, name="temp init 0.03", temp_init=0.03),
            replace(base, name="wd 1.0", weight_decay=1.0),
            replace(base, name="embed 256", embed_dim=256),
            replace(base, name="drop 0.2 (image)", drop=0.2),
            replace(base, name="lr 3e-3", lr=3e-3),
            replace(base, name="mlp heads", head="mlp"),
            replace(base, name="batch 128", batch_size=128),
            replace(base, name="siglip", loss="siglip", temp_init=0.1),
        ]
    if name == "features":  # image/text feature changes on the cached towers
        t8 = dict(templates=TEMPLATES8, query_ensemble=TEMPLATES8)
        all4 = ("block4", "block5", "block6", "head")
        return [
            replace(base, name="stages 4-6+head, standardize", stages=all4, standardize=True),
            replace(base, name="+query ensemble only", query_ensemble=TEMPLATES8),
            replace(base, name="standardize", standardize=True),
            replace(base, name="+templates (train) +query ensemble", **t8),
        ]
    if name == "seeds":  # the candidates within a point of today's on validation, more seeds
        t8 = dict(templates=TEMPLATES8, query_ensemble=TEMPLATES8)
        return [
            replace(base, seed=2),
            *[replace(base, name="+templates (train) +query ensemble", **t8, seed=s) for s in (1, 2)],
            replace(base, name="drop 0.2 (image)", drop=0.2, seed=1),
        ]
    if name == "views":  # several cached views per image (one drawn per epoch), test-time view averaging
        return [
            replace(base, name=f"views {v} tta {t}", views=v, tta=t)
            for v, t in ((3, 1), (3, 3), (1, 3), (4, 1), (4, 4))
        ]
    if name == "hard":  # hard-negative batches: k-means clusters of the captions' text features
        return [
            replace(base, name="hard batches, 16 clusters", hard_clusters=16),
            replace(base, name="hard batches, 64 clusters", hard_clusters=64),
        ]
    if name == "style-combos":  # OpenMoji rows with the single changes that were not worse on K-fold validation
        rows = replace(base, style_rows=True)
        return [
            replace(rows, name="openmoji rows, embed 1024", embed_dim=1024),
            replace(rows, name="openmoji rows, batch 512", batch_size=512),
            replace(rows, name="openmoji rows, drop 0.2", drop=0.2),
            replace(rows, name="openmoji rows, lr 5e-4", lr=5e-4),
            replace(rows, name="openmoji rows, +colour x10", stages=("head", "colour"), colour_weight=10.0),
            replace(rows, name="openmoji rows, stages 4-6+head", stages=("block4", "block5", "block6", "head")),
        ]
    if name == "style-1024-seeds":
        rows = replace(base, style_rows=True, embed_dim=1024, name="openmoji rows, embed 1024")
        return [
            *[replace(rows, seed=s) for s in (1, 2)],
            *[replace(base, name="embed 1024", embed_dim=1024, seed=s) for s in (1, 2)],
        ]
    if name == "style-half":
        rows = replace(base, style_rows=True, embed_dim=1024, style_rows_fraction=0.5)
        return [replace(rows, name="openmoji rows for half the concepts, embed 1024", seed=s) for s in (0, 1, 2)]
    if name == "style-refit":  # the demo recipe, then refit on train + validation for the chosen epoch count
        rows = replace(base, style_rows=True, embed_dim=1024, refit=True, epochs=0)
        return [replace(rows, name="openmoji rows, embed 1024, refit on train+val", seed=s) for s in (0, 1, 2)]
    if name == "multi-positive":  # duplicate captions and a concept's two styles are not negatives
        rows = replace(base, style_rows=True, embed_dim=1024, loss="infonce-multi")
        return [replace(rows, name="openmoji rows, embed 1024, multi-positive InfoNCE", seed=s) for s in (0, 1, 2)]
    if name == "querybank":  # the demo recipe scored with querybank normalisation at a few temperatures
        rows = replace(base, style_rows=True, embed_dim=1024)
        return [
            replace(rows, name=f"openmoji rows, embed 1024, querybank tau {t}", querybank=t, seed=s)
            for t in (0.05, 0.1, 0.2)
            for s in (0, 1, 2)
        ]
    if name.startswith("extra"):  # the demo recipe with extra rows (--extra-features): extra[-cv][:MODES[:SEEDS]]
        kind, *rest = name.split(":")
        modes = rest[0].split(",") if rest else ["", "all", "clean"]
        seeds = [int(x) for x in rest[1].split(",")] if len(rest) > 1 else [0, 1, 2]
        rows = replace(base, style_rows=True, embed_dim=1024, refit=True, epochs=0)
        if kind == "extra-cv":  # no refit: plain K-fold validation in both styles
            rows = replace(base, style_rows=True, embed_dim=1024)
        name_of = {
            "": "openmoji rows, embed 1024" + (", refit" if rows.refit else ""),
            "all": "+ extra rows",
            "clean": "+ extra rows (held-out names dropped)",
            "novel": "+ extra rows (every Twemoji name dropped)",
            "clean-probe": "+ extra rows (held-out and probe held-out names dropped)",
        }
        out = []
        for m in modes:  # MODE or MODE@X: X extra rows per own row each epoch
            mode, _, per = m.partition("@")
            name = name_of[mode] + (f", {per} per own row each epoch" if per else "")
            out += [replace(rows, name=name, extra_rows=mode, extra_per_epoch=float(per or 0), seed=s) for s in seeds]
        return out
    if name == "style-final":  # the candidates, scored by K-fold validation in both styles
        return [
            *[replace(base, seed=s) for s in (0, 1, 2)],
            *[replace(base, name="openmoji rows", style_rows=True, seed=s) for s in (0, 1, 2)],
            replace(base, name="openmoji style p=0.3", style=0.3),
        ]
    if name == "style":  # OpenMoji drawings of the training concepts as a second style, seeds 0-2
        return [
            *[replace(base, seed=s) for s in (0, 1, 2)],
            *[replace(base, name=f"openmoji style p={p}", style=p, seed=s) for p in (0.5,) for s in (0, 1, 2)],
            replace(base, name="openmoji style p=0.3", style=0.3),
            *[replace(base, name="openmoji rows", style_rows=True, seed=s) for s in (0, 1, 2)],
            replace(base, name="openmoji rows, 15 epochs", style_rows=True, epochs=15),
            replace(
                base, name="openmoji style p=0.5 +colour x10", style=0.5, stages=("head", "colour"), colour_weight=10.0
            ),
            replace(base, name="+colour x10", stages=("head", "colour"), colour_weight=10.0),
        ]
    if name == "text":  # MiniLM's last layer trains too (LiT's "locked image, unlocked text" at cache speed)
        return [
            replace(base, name="unlock text layer 6", unlock_text=1),
            replace(base, name="unlock text layer 6, its lr 1e-4", unlock_text=1, trunk_lr=1e-4),
            replace(base, name="unlock text layer 6, its lr 3e-5", unlock_text=1, trunk_lr=3e-5),
        ]
    if name == "colour":  # a colour histogram beside the trunk's features
        hc = ("head", "colour")
        return [
            *[replace(base, name=f"+colour x{w}", stages=hc, colour_weight=w) for w in (3.0, 10.0, 20.0)],
            replace(base, name="+colour, standardize", stages=hc, standardize=True),
        ]
    if name == "today":  # today's recipe, seed 0 (a check that the cache reproduces the earlier figures)
        return [base]
    if name == "steps":  # more optimizer steps for the same data: smaller batches, or a floor on steps
        return [
            replace(base, name="batch <= n/8", min_steps_per_epoch=8),
            replace(base, name="min 300 steps", min_steps=300),
        ]
    if name == "steps-seeds":
        return [replace(base, name="batch <= n/8", min_steps_per_epoch=8, seed=s) for s in (1, 2)]
    if name == "fa-next":  # the Font Awesome fine-tune, demo recipe (n/5), and what might lift image→text
        fa = replace(base, init="emoji", min_steps_per_epoch=5)
        return [
            *[replace(fa, name="fa: batch <= n/5", seed=s) for s in (0, 1, 2)],
            *[replace(fa, name="fa: refit on train+val", refit=True, epochs=0, seed=s) for s in (0, 1, 2)],
            replace(fa, name="fa: lr 3e-3", lr=3e-3),
            replace(fa, name="fa: epochs 60", epochs=60),
            replace(fa, name="fa: temp init from emoji, wd 0", weight_decay=0.0),
        ]
    if name == "fa-unlock":  # the last EfficientNet block trained on Font Awesome's cached maps
        fa = replace(base, init="emoji", min_steps_per_epoch=5)
        return [
            *[replace(fa, name="fa: unlock 1 block", unlock=1, seed=s) for s in (0, 1, 2)],
            replace(fa, name="fa: unlock 1 block, its lr 1e-4", unlock=1, trunk_lr=1e-4),
        ]
    if name == "fa-epochs":  # from the demo's final model (--emoji-final): is 30 epochs enough for the block?
        fa = replace(base, init="emoji", embed_dim=1024, min_steps_per_epoch=5, unlock=1)
        return [
            replace(fa, name=f"fa: unlock 1 block, {e} epochs", epochs=e, seed=s) for e in (30, 60) for s in (0, 1, 2)
        ]
    if name == "fa-unlock-refit":  # ... then refit on train + validation for the epoch count validation chose
        fa = replace(base, init="emoji", min_steps_per_epoch=5, unlock=1, refit=True, epochs=0)
        return [replace(fa, name="fa: unlock 1 block, refit on train+val", seed=s) for s in (0, 1, 2)]
    if name == "fontawesome-n5":  # 5 steps per epoch: keeps emoji's 1,301 at batch 256 (260 // 1)
        fa = replace(base, init="emoji")
        return [replace(fa, name="fa: batch <= n/5", min_steps_per_epoch=5, seed=s) for s in (0, 1, 2)]
    if name == "fontawesome-seeds":
        fa = replace(base, init="emoji")
        return [
            *[replace(fa, name="fa: today", seed=s) for s in (1, 2)],
            *[replace(fa, name="fa: batch <= n/8", min_steps_per_epoch=8, seed=s) for s in (1, 2)],
        ]
    if name == "fontawesome":  # fine-tune the emoji heads on Font Awesome (run with --features on its cache)
        fa = replace(base, init="emoji")
        return [
            replace(fa, name="fa: today"),
            replace(fa, name="fa: batch <= n/8", min_steps_per_epoch=8),
            replace(fa, name="fa: batch <= n/16", min_steps_per_epoch=16),
            replace(fa, name="fa: min 300 steps", min_steps=300),
            replace(fa, name="fa: batch <= n/8, epochs 60", min_steps_per_epoch=8, epochs=60),
        ]
    if name == "unlock":  # the trunk's last block + conv_head trained on cached stage-5 maps
        return [
            replace(base, name="unlock 1 block, 15 epochs", unlock=1, epochs=15),
            replace(base, name="unlock 1 block, 15 epochs, trunk lr 1e-4", unlock=1, epochs=15, trunk_lr=1e-4),
            replace(base, name="15 epochs", epochs=15),
            replace(base, name="unlock 1 block, 15 epochs, views 3", unlock=1, epochs=15, views=3),
        ]
    raise SystemExit(f"unknown grid {name}")


def row(run: dict) -> str:
    r = run["recipe"]
    v = run["val"]
    h = run["heldout"]
    fmt = " / ".join
    name = r["name"]
    if run.get("before"):  # a fine-tune: the starting heads' held-out R@10 and the lift over it
        b = run["before"]
        name += (
            f" (start t2i/i2t R@10 {100 * b['t2i_R@10']:.1f}/{100 * b['i2t_R@10']:.1f}; lift "
            f"{h['t2i_R@10'] / b['t2i_R@10']:.2f}× / {h['i2t_R@10'] / b['i2t_R@10']:.2f}×)"
        )
    if run.get("cv"):  # K-fold validation: mean ± spread of the folds' mean recall
        cv = run["cv"]
        name += f" (cv {100 * sum(cv) / len(cv):.1f}, folds {min(cv) * 100:.1f}–{max(cv) * 100:.1f})"
    if run.get("cv_without_refit"):
        cw = run["cv_without_refit"]
        name += f" (nested cv without refit {100 * sum(cw) / len(cw):.1f})"
    if run.get("cv_style"):
        cs = run["cv_style"]
        name += f" (cv OpenMoji {100 * sum(cs) / len(cs):.1f})"
    if run.get("heldout_style"):  # the same held-out concepts drawn by OpenMoji: does it carry across styles?
        o = run["heldout_style"]
        name += f" (OpenMoji held-out t2i/i2t R@10 {100 * o['t2i_R@10']:.1f}/{100 * o['i2t_R@10']:.1f})"
    if run.get("heldout_test_style"):  # a style nothing trained or chose on (Symbola)
        o = run["heldout_test_style"]
        name += f" (Symbola held-out t2i/i2t R@10 {100 * o['t2i_R@10']:.1f}/{100 * o['i2t_R@10']:.1f})"
    if run.get("heldout_probe"):  # e.g. Font Awesome's held-out split, before any fine-tune
        o = run["heldout_probe"]
        name += f" (probe held-out t2i/i2t R@10 {100 * o['t2i_R@10']:.1f}/{100 * o['i2t_R@10']:.1f})"
    if run.get("extra"):
        name += f" ({run['extra']['rows']} extra rows)"
    return (
        f"| {name} | {r['seed']} | {run['best_epoch']} | "
        f"{v.get('mean_recall', 0) * 100:.1f} | {fmt(f'{100 * v[k]:.1f}' for k in KEYS[:3]) if v else '–'} | "
        f"{fmt(f'{100 * h[k]:.1f}' for k in KEYS[:3])} | {fmt(f'{100 * h[k]:.1f}' for k in KEYS[3:])} | "
        f"{run['seconds']:.0f} |"
    )


def table(runs: list[dict]) -> str:
    head = (
        "| recipe | seed | epoch (val) | val mean R | val t2i R@1/5/10 | held-out t2i R@1/5/10 | "
        "held-out i2t R@1/5/10 | s |\n|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *[row(x) for x in runs]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", default="bench-out/quality")
    ap.add_argument("--grid", default="baseline")
    ap.add_argument("--json", default=None, help="append runs to this JSON list")
    ap.add_argument("--table-from", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="print every epoch's validation recall")
    ap.add_argument("--emoji-features", default="bench-out/quality", help="the emoji cache (init heads, trunk)")
    ap.add_argument("--emoji-style-features", default=None, help="OpenMoji cache for the init heads (demo recipe)")
    ap.add_argument("--emoji-final", action="store_true", help="init heads: the demo's final recipe (1024-d, refit)")
    ap.add_argument("--style-features", default=None, help="OpenMoji features of the same emoji (--domain openmoji)")
    ap.add_argument("--test-style-features", default=None, help="a style measured only (--domain symbola)")
    ap.add_argument("--folds", type=int, default=0, help="also score each recipe by K-fold validation")
    ap.add_argument(
        "--extra-features", action="append", default=[], help="caches of other concepts: extra training rows"
    )
    ap.add_argument("--probe-features", default=None, help="score each run's heads on this cache's held-out split too")
    ap.add_argument("--part", default="0/1", help="K/N: run every N-th recipe of the grid from the K-th")
    args = ap.parse_args()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())))
        return
    torch.set_num_threads(args.threads)
    global EMOJI_FEATURES, EMOJI_STYLE, EMOJI_FINAL, _INIT, VERBOSE
    EMOJI_FINAL = args.emoji_final
    VERBOSE = args.verbose
    EMOJI_FEATURES = Path(args.emoji_features)
    EMOJI_STYLE = Path(args.emoji_style_features) if args.emoji_style_features else None
    _INIT = EMOJI_FEATURES / "init"
    data = Data(
        Path(args.features),
        Path(args.style_features) if args.style_features else None,
        Path(args.test_style_features) if args.test_style_features else None,
    )
    global PROBE
    PROBE = Data(Path(args.probe_features)) if args.probe_features else None
    for folder in args.extra_features:
        data.add_extra(Path(folder), PROBE)
    if args.extra_features:
        print({k: len(v) for k, v in data.extra.items()}, "extra rows per mode")
    runs = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []
    k, n = (int(x) for x in args.part.split("/"))
    for r in grid(args.grid)[k::n]:
        if max(r.views, r.tta) > data.views:
            print(f"skipped {r.name}: needs {max(r.views, r.tta)} cached views, {data.views} present")
            continue
        run = asdict(train_recipe(data, r, args.folds))
        runs.append(run)
        print(row(run), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
