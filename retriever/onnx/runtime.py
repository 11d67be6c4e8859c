"""Encode texts and images with an exported model on onnxruntime, without torch.

Nothing here imports torch, open_clip, torchvision or transformers: a query process pays for
onnxruntime, numpy, PIL and (for Hugging Face text towers) the `tokenizers` library only. Each step
reproduces what the torch path does, so that vectors agree to float rounding:

* open_clip's CLIP BPE tokenizer (`ClipBpeTokenizer`) is reimplemented from its merges file, with
  the same text cleaning (ftfy, HTML unescape, whitespace, lower case) and truncation;
* Hugging Face towers use the tokenizer.json that open_clip's `HFTokenizer` wraps, padded and
  truncated to the context length the same way;
* images are decoded by `retriever.data.images.load_image` (EXIF, alpha onto white) and resized,
  cropped and normalised with PIL + numpy exactly as open_clip's torchvision eval transform does.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retriever.data.images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.onnx import EXPORT_JSON, FORMAT_VERSION


class ExportUnusable(UserError):
    """An export folder that cannot serve this model: missing, corrupt, stale or unloadable."""


# --------------------------------------------------------------------------------------------
# Text cleaning and tokenisation
# --------------------------------------------------------------------------------------------


def _basic_clean(text: str) -> str:
    import ftfy  # open_clip's own dependency; pure Python

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def clean_text(text: str, mode: str) -> str:
    """open_clip's `get_clean_fn(mode)`: 'lower' (CLIP BPE) or 'whitespace' (HF towers)."""
    if mode == "lower":
        return _whitespace_clean(_basic_clean(text)).lower()
    if mode == "whitespace":
        return _whitespace_clean(_basic_clean(text))
    raise ExportUnusable(f"The export asks for text cleaning {mode!r}, which this runtime does not know.")


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (same order as open_clip's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ClipBpeTokenizer:
    """open_clip's `SimpleTokenizer` (the CLIP byte-level BPE) without torch.

    Parameters: `bpe_path` the gzipped merges file (open_clip's bpe_simple_vocab_16e6.txt.gz, copied
    into the export), `context_length` the padded length, `clean` the cleaning mode.
    """

    def __init__(self, bpe_path: str | Path, context_length: int, clean: str = "lower"):
        import regex  # \p{L} classes; the `re` module has none

        merges_text = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        vocab = list(_bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        specials = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(specials)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in specials}
        self.byte_encoder = _bytes_to_unicode()
        self.pat = regex.compile(
            "|".join(specials) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self.sot, self.eot = self.encoder[specials[0]], self.encoder[specials[1]]
        self.context_length = int(context_length)
        self.clean = clean

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in self.pat.findall(clean_text(text, self.clean)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, context_length) int64 token ids: <sot> text <eot>, zero padded, truncated keeping <eot>."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out


class HfTokenizer:
    """open_clip's `HFTokenizer` (default mode) on the `tokenizers` library: clean, then pad and
    truncate every text to `context_length` with the tokenizer's own special tokens."""

    def __init__(self, tokenizer_json: str | Path, context_length: int, clean: str = "whitespace", pad_id: int = 0):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(context_length))
        self.context_length = int(context_length)
        self.clean = clean
        self.pad_id = int(pad_id)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encs = self.tokenizer.encode_batch([clean_text(t, self.clean) for t in texts])
        out = np.full((len(texts), self.context_length), self.pad_id, np.int64)
        for row, enc in enumerate(encs):
            ids = enc.ids[: self.context_length]
            out[row, : len(ids)] = ids
        return out


def make_tokenizer(folder: Path, spec: dict[str, Any]):
    """The tokenizer an export's `text.tokenizer` entry describes, files read from `folder`."""
    kind = spec.get("kind")
    files = [folder / f for f in spec.get("files", [])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportUnusable(f"the export's tokenizer file {', '.join(missing)} is missing")
    if kind == "clip_bpe":
        return ClipBpeTokenizer(files[0], spec["context_length"], spec.get("clean", "lower"))
    if kind == "hf":
        return HfTokenizer(files[0], spec["context_length"], spec.get("clean", "whitespace"), spec.get("pad_id", 0))
    raise ExportUnusable(f"the export's tokenizer kind {kind!r} is not one this runtime knows")


# --------------------------------------------------------------------------------------------
# Image preprocessing (open_clip's eval transform, in PIL + numpy)
# --------------------------------------------------------------------------------------------

_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resized_shortest(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)` output (w, h): the short side becomes `size`, the long side is floored."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _resize(img: Image.Image, w: int, h: int, interpolation: str) -> Image.Image:
    if img.size == (w, h):  # torchvision returns the image untouched then
        return img
    return img.resize((w, h), _PIL_FILTERS[interpolation])


def _center_crop_or_pad(arr: np.ndarray, out_h: int, out_w: int, fill: int) -> np.ndarray:
    """torchvision's center_crop (and open_clip's center_crop_or_pad) on an (H, W, 3) uint8 array."""
    h, w = arr.shape[:2]
    if out_w > w or out_h > h:
        left, top = max(out_w - w, 0) // 2, max(out_h - h, 0) // 2
        right, bottom = (max(out_w - w, 0) + 1) // 2, (max(out_h - h, 0) + 1) // 2
        arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
        h, w = arr.shape[:2]
        if (h, w) == (out_h, out_w):
            return arr
    top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
    return arr[top : top + out_h, left : left + out_w]


def preprocess_image(img: Image.Image, cfg: dict[str, Any]) -> np.ndarray:
    """An RGB PIL image -> (3, H, W) float32, as open_clip's `image_transform(is_train=False)`.

    `cfg` holds `size` ([H, W]), `resize_mode` (shortest, longest or squash), `interpolation`,
    `mean`, `std` and `fill_color`, as the export recorded them.
    """
    out_h, out_w = cfg["size"]
    interp = cfg.get("interpolation", "bicubic")
    interp = interp if interp in _PIL_FILTERS else "bicubic"  # open_clip maps 'random' to bicubic at eval
    mode = cfg.get("resize_mode", "shortest")
    w, h = img.size
    if mode == "squash":
        arr = np.asarray(_resize(img, out_w, out_h, interp))
    elif mode == "longest":
        ratio = max(h / out_h, w / out_w)
        img = _resize(img, round(w / ratio), round(h / ratio), interp)
        arr = _center_crop_or_pad(np.asarray(img), out_h, out_w, int(cfg.get("fill_color", 0)))
    else:
        if out_h == out_w:
            img = _resize(img, *_resized_shortest(w, h, out_h), interp)
        else:  # open_clip's ResizeKeepRatio(longest=0), bicubic
            ratio = min(h / out_h, w / out_w)
            img = _resize(img, round(w / ratio), round(h / ratio), "bicubic")
        arr = _center_crop_or_pad(np.asarray(img), out_h, out_w, 0)
    x = arr.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def read_export_info(folder: str | Path) -> dict[str, Any]:
    """export.json of an export folder; ExportUnusable when absent or unreadable."""
    path = Path(folder) / EXPORT_JSON
    if not path.is_file():
        raise ExportUnusable(f"no ONNX export in {Path(folder)}")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportUnusable(f"{path} is unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise ExportUnusable(f"{path} is not a format-{FORMAT_VERSION} retriever ONNX export")
    return info


def _read_checked(folder: Path, entry: dict[str, Any]) -> bytes:
    """The bytes of an .onnx file, refused unless size and SHA-256 match what the export recorded."""
    path = folder / entry["file"]
    try:
        data = path.read_bytes()
    except OSError:
        raise ExportUnusable(f"{path} is missing or unreadable") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ExportUnusable(f"{path} is corrupt or was replaced (its size or SHA-256 differs from export.json)")
    return data


def drop_padding_columns(tokens: np.ndarray, pad_id: int) -> np.ndarray:
    """The (N, L) token batch without its trailing columns that hold only padding (at least one kept).

    The text towers ignore padding (HF towers mask it; CLIP's causal mask and end-of-text pooling
    never look past the end token), so the embeddings are the same and the work scales with the
    longest text instead of the context length.
    """
    used = np.flatnonzero((tokens != pad_id).any(axis=0))
    return tokens[:, : int(used[-1]) + 1 if used.size else 1]


class OnnxEncoder:
    """encode_texts / encode_images with an exported model: the same (N, D) float32 unit vectors as
    `retriever.models.encode`. Sessions are created on first use of each tower, so a text query
    never loads the image tower.

    Parameters: `folder` the export folder; `expected` the identity the vectors must come from
    (ExportUnusable when the export is of another model); `threads` ORT intra-op threads (None: ORT's
    default, one per core).
    """

    backend = "onnx"

    def __init__(self, folder: str | Path, expected: ModelIdentity | None = None, threads: int | None = None):
        self.folder = Path(folder)
        self.info = read_export_info(self.folder)
        try:
            self.identity = ModelIdentity.from_dict(self.info["identity"])
        except (KeyError, TypeError, ValueError):
            raise ExportUnusable(f"{self.folder / EXPORT_JSON} records no model identity") from None
        if expected is not None and (
            self.identity.weights_sha256 != expected.weights_sha256 or self.identity.embed_dim != expected.embed_dim
        ):
            raise ExportUnusable(
                f"the export in {self.folder} is of another model (sha256 {self.identity.weights_sha256[:12]}, "
                f"the index's is {expected.weights_sha256[:12]})"
            )
        for tower in ("text", "image"):
            entry = self.info.get(tower) or {}
            if not all(k in entry for k in ("file", "bytes", "sha256")):
                raise ExportUnusable(f"{self.folder / EXPORT_JSON} lacks the {tower} tower")
            if not (self.folder / entry["file"]).is_file():
                raise ExportUnusable(f"{self.folder / entry['file']} is missing")
            if (self.folder / entry["file"]).stat().st_size != entry["bytes"]:
                raise ExportUnusable(f"{self.folder / entry['file']} is truncated or was replaced")
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._tokenizer = None
        self.text_info = self.info["text"]
        self.image_info = self.info["image"]

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    def describe(self) -> str:
        return f"ONNX export in {self.folder}"

    def load(self, tower: str | None = None) -> OnnxEncoder:
        """Create the session(s) now (both towers by default) so that a broken file fails here."""
        for t in [tower] if tower else ["text", "image"]:
            self._session(t)
        if tower in (None, "text"):
            self.tokenizer  # noqa: B018
        return self

    def _session(self, tower: str):
        if tower not in self._sessions:
            import onnxruntime as ort

            entry = self.info[tower]
            data = _read_checked(self.folder, entry)
            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3  # ORT's warnings about unused initialisers are noise here
            try:
                self._sessions[tower] = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented)
                raise ExportUnusable(
                    f"onnxruntime {ort.__version__} cannot load {self.folder / entry['file']} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                ) from None
        return self._sessions[tower]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self.folder, self.text_info["tokenizer"])
        return self._tokenizer

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        if self.text_info.get("dynamic_length"):
            tokens = drop_padding_columns(tokens, int(self.text_info["tokenizer"].get("pad_id", 0)))
        sess = self._session("text")
        return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(tokens, np.int64)})[0]

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """A preprocessed (N, 3, H, W) float32 batch -> (N, D) unit vectors."""
        sess = self._session("image")
        return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(pixels, np.float32)})[0]

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess_image(img, self.image_info["preprocess"])

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = [self.encode_tokens(self.tokenizer(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_images(
        self, images: Iterable[ImageInput], batch_size: int = 32, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        """Paths, bytes or PIL images. Raises on an undecodable image (a caller's input), or one that
        decodes to more than `max_pixels` pixels (None: no limit)."""
        out, batch = [], []
        for img in images:
            batch.append(self.preprocess(load_image(img, max_pixels)))
            if len(batch) == batch_size:
                out.append(self.encode_pixels(np.stack(batch)))
                batch = []
        if batch:
            out.append(self.encode_pixels(np.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
