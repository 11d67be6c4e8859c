"""A query people actually write: weighted texts, images and indexed items, some of them negative,
plus a filter, a score floor and near-duplicate folding. Torch-free: a plain value.

The query vector is q = normalise(Σ wᵢ·f(positiveᵢ) − Σ wⱼ·f(negativeⱼ)), where f is the model's
text or image encoder, or the stored vector of an indexed item (`id:N`).

Term syntax (CLI and `Term.parse`): an optional weight `W:` then an optional kind prefix:

    snow            text (or an image file, for --and-image / --not-image)
    2:snow          text with weight 2 (any number: 0.5:snow, 1e-1:snow)
    id:123          the indexed item whose id is 123
    image:a+b.jpg   an image file (the prefix is needed only where text is the default)
    text:id:123     the literal text "id:123"
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retriever.errors import UserError

KINDS = ("text", "image", "id")
MODALITIES = ("image", "text")
_WEIGHT = re.compile(r"^([+-]?[0-9][0-9.eE+-]*|[+-]?\.[0-9][0-9.eE+-]*):(.*)$", re.S)
_KIND = re.compile(r"^(text|image|id):(.*)$", re.S)


@dataclass(frozen=True)
class Term:
    kind: str  # "text" | "image" | "id"
    value: Any  # text, image path (str or Path), or an item id (int)
    weight: float = 1.0
    negative: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"Unknown query term kind {self.kind!r}; use text, image or id.")
        check_weight(self.weight, self.value)
        if self.kind == "text" and not str(self.value).strip():
            raise UserError("A query term is empty text; give words to search for.")

    @classmethod
    def parse(cls, raw: str, default_kind: str = "text", negative: bool = False) -> Term:
        """A term written as `[WEIGHT:][text:|image:|id:]VALUE` (see the module docstring)."""
        s = str(raw)
        weight = 1.0
        m = _WEIGHT.match(s)
        if m:
            try:
                weight = float(m.group(1))
            except ValueError:
                raise UserError(
                    f"The weight {m.group(1)!r} in {raw!r} is not a number (write e.g. 2:{m.group(2)})."
                ) from None
            s = m.group(2)
        kind = default_kind
        m = _KIND.match(s)
        if m:
            kind, s = m.group(1), m.group(2)
        if kind == "id":
            try:
                value: Any = int(s.strip())
            except ValueError:
                raise UserError(f"{raw!r}: an indexed item is written id:N with a whole number N.") from None
        elif kind == "image":
            value = s
            if not s.strip():
                raise UserError(f"{raw!r} names no image file.")
        else:
            value = s
            if not s.strip():
                raise UserError("The query is empty; give a text, an image or id:N.")
        return cls(kind, value, weight, negative)

    def to_dict(self) -> dict:
        return {
            self.kind: str(self.value) if self.kind == "image" else self.value,
            "weight": self.weight,
            "negative": self.negative,
        }


def check_weight(weight: Any, what: Any = "") -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UserError(f"The weight {weight!r} of query term {what!r} is not a number.")


def check_options(modality: str, k: int, where: str | None, min_score: float | None, dedup: float | None) -> None:
    """A query's options, each wrong one explained in a sentence."""
    if modality not in MODALITIES:
        raise UserError(f"Unknown modality {modality!r}; choose image or text.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"k must be a whole number of at least 1, not {k!r}.")
    for flag, v in (("--min-score", min_score), ("--dedup", dedup)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not -1 <= v <= 1):
            raise UserError(f"{flag} must be a cosine similarity between -1 and 1, not {v!r}.")
    if where is not None and (not isinstance(where, str) or not where.strip()):
        raise UserError('The --where filter is empty; give a condition such as "year >= 2020".')


@dataclass(frozen=True)
class Query:
    """What `Retriever.search` answers: terms, where to look and how to trim the hits.

    terms: one or more `Term`s (at least one positive); modality: what to retrieve ("image" or
    "text" rows); k: how many hits; where: SQL condition over the rows' columns; min_score: drop
    hits scoring below it (cosine, in [-1, 1]); dedup: fold hits within this cosine of a better
    hit into it; keep_query: keep the query's own images and items in the results.
    """

    terms: tuple[Term, ...]
    modality: str = "image"
    k: int = 10
    where: str | None = None
    min_score: float | None = None
    dedup: float | None = None
    keep_query: bool = False
    tag: Any = None  # echoed back with batch results (the "id" field of a JSONL query)

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            raise UserError("The query is empty; give a text, an image or id:N.")
        if all(t.negative for t in self.terms):
            raise UserError("The query has only negative terms; give at least one thing to search for.")
        check_options(self.modality, self.k, self.where, self.min_score, self.dedup)

    @classmethod
    def of(
        cls,
        text: str | None = None,
        image: Any = None,
        *,
        and_: Sequence[str] = (),
        not_: Sequence[str] = (),
        and_images: Sequence[Any] = (),
        not_images: Sequence[Any] = (),
        **options,
    ) -> Query:
        """A query from the CLI's pieces: a main text and/or image plus --and/--not terms."""
        terms = []
        if text is not None:
            terms.append(Term.parse(text, "text"))
        if image is not None:
            terms.append(_image_term(image))
        terms += [Term.parse(t, "text") for t in and_]
        terms += [Term.parse(t, "text", negative=True) for t in not_]
        terms += [_image_term(p) for p in and_images]
        terms += [replace(_image_term(p), negative=True) for p in not_images]
        return cls(tuple(terms), **options)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Query:
        """A JSONL query: {"text"|"image"|"id": …, "terms": [{"text": …, "weight": 2, "negative": true}],
        "k", "modality", "where", "min_score", "dedup", "keep_query", "tag"}; unset options from `defaults`."""
        if not isinstance(d, Mapping):
            raise UserError("A query must be a JSON object or a plain line of text.")
        known = {"text", "image", "id", "terms", "k", "modality", "where", "min_score", "dedup", "keep_query", "tag"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"Unknown query field {unknown[0]!r}; known fields are {', '.join(sorted(known))}.")
        terms = [_term_from_dict({key: d[key]}) for key in ("text", "image", "id") if key in d]
        raw_terms = d.get("terms", [])
        if not isinstance(raw_terms, list):
            raise UserError('"terms" must be a list of objects such as {"text": "snow", "weight": 2}.')
        terms += [_term_from_dict(t) for t in raw_terms]
        opts = {**(defaults or {}), **{key: d[key] for key in known - {"text", "image", "id", "terms"} if key in d}}
        return cls(tuple(terms), **opts)

    def with_options(self, **changes) -> Query:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "terms": [t.to_dict() for t in self.terms],
            "modality": self.modality,
            "k": self.k,
            "where": self.where,
            "min_score": self.min_score,
            "dedup": self.dedup,
            "keep_query": self.keep_query,
        }


def _image_term(p: Any) -> Term:
    if isinstance(p, (str, Path)):
        return Term.parse(str(p), "image") if isinstance(p, str) else Term("image", p)
    return Term("image", p)  # an already-decoded image (PIL, bytes, array)


def _term_from_dict(t: Any) -> Term:
    if not isinstance(t, Mapping):
        raise UserError('Each query term must be an object such as {"text": "snow", "weight": 2}.')
    kinds = [key for key in KINDS if key in t]
    if len(kinds) != 1:
        raise UserError(f"A query term needs exactly one of text, image or id; got {sorted(t)}.")
    kind = kinds[0]
    value = t[kind]
    if kind == "id" and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"The item id {value!r} is not a whole number.")
    if kind != "id" and not isinstance(value, str):
        raise UserError(f"The {kind} of a query term must be a string, not {value!r}.")
    negative = t.get("negative", False)
    if not isinstance(negative, bool):
        raise UserError(f'"negative" must be true or false, not {negative!r}.')
    return Term(kind, value, t.get("weight", 1.0), negative)


@dataclass
class QueryReport:
    """What happened to a query beyond its hits (the CLI prints it; --json includes it)."""

    filter_strategy: str = "none"  # none | prefilter | postfilter
    matching_rows: int | None = None  # rows the filter let through
    below_min_score: int = 0  # hits dropped by the score floor
    folded_duplicates: int = 0  # hits folded into better ones by dedup
    excluded_query_items: int = 0  # the query's own images/items left out
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {
            "filter_strategy": self.filter_strategy,
            "matching_rows": self.matching_rows,
            "below_min_score": self.below_min_score,
            "folded_duplicates": self.folded_duplicates,
            "excluded_query_items": self.excluded_query_items,
        }
        d.update(self.extra)
        return d
