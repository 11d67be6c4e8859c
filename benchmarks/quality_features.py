"""Cache the demo towers' outputs once, for the head-training ablations in quality_ablation.py.

For every Twemoji concept of the demo collection (retriever.demo.emoji), this runs the locked
EfficientNet-Lite0 trunk over the evaluation view and `--views` augmented views, and keeps the
globally average-pooled output of several stages (blocks 4, 5, 6 and the 1280-channel head conv),
so multi-stage pooling can be ablated without another pass. The locked MiniLM runs over every
caption (name and aliases) under every prompt template of `TEMPLATES`. Everything is written to
one safetensors file plus a JSON of the strings and items, under `--out`.

    PYTHONPATH=$PWD python benchmarks/quality_features.py --out bench-out/quality --views 8

Augmented views are geometric only (scale, translate, small rotation, white fill): no flips (arrows'
directions) and no colour jitter ("red heart" vs "pink heart").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# CLIP-style prompt templates (Radford et al. 2021, "prompt engineering and ensembling"), kept to
# generic picture words so they describe any icon / clip-art collection, not Twemoji's names.
TEMPLATES = (
    "{}",
    "an emoji of {}",
    "an icon of {}",
    "a picture of {}",
    "a drawing of {}",
    "a cartoon of {}",
    "clip art of {}",
    "a symbol of {}",
)
STAGES = ("block4", "block5", "block6", "head")


def stage_features(trunk, px: torch.Tensor) -> dict[str, torch.Tensor]:
    """Average-pooled outputs of the last stages of a timm EfficientNet (one forward pass)."""
    x = trunk.conv_stem(px)
    x = trunk.bn1(x)
    out = {}
    for i, block in enumerate(trunk.blocks):
        x = block(x)
        if i >= 4:
            out[f"block{i}"] = x.mean(dim=(2, 3))
        if i == 5:  # stage-5 maps: the input of the last block, for training it at cache speed
            out["map5"] = x.half()
    x = trunk.bn2(trunk.conv_head(x))
    out["head"] = x.mean(dim=(2, 3))
    return out


SYMBOLA = "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"


def symbola_images(items, out: Path) -> dict[str, str]:
    """Single-code-point emoji that the Symbola font draws, black on white; ``{char: png path}``.

    Sequences (ZWJ, flags, keycaps) are left out: Symbola would draw their parts side by side. The
    variation selector U+FE0F is dropped before drawing (Symbola has no glyph for it).
    """
    from dataclasses import replace

    from retriever.demo.openmoji import font_images

    base = {it.char: it.char.replace("\ufe0f", "") for it in items}
    single = [replace(it, char=base[it.char]) for it in items if len(base[it.char]) == 1]
    drawn = font_images(single, SYMBOLA, out, colour=False)
    return {char: drawn[b] for char, b in base.items() if b in drawn}


# ------------------------------------------------------------------------------------------------
# Extra training rows: captioned pictures of OTHER concepts from PyPI wheels (issue 14, data pass).
# Each item's concept is the icon / sprite name; its one caption is that name with hyphens,
# underscores and camelCase turned into spaces. None of these is Font Awesome (the fine-tune test
# domain), Noto, Tux Paint or openclipart.

EXTRA_DOMAINS = ("mdi", "phosphor", "remix", "arcade")


def _glyph_items(prefix: str, names: dict[str, str], font_path: str | Path, out: Path, size: int = 96):
    """Draw `{caption: glyph}` black on white, centred, 75 % of `size` (as Font Awesome is drawn)."""
    from PIL import Image, ImageFont

    from retriever.demo.emoji import EmojiImage
    from retriever.demo.icons import draw_glyph

    font = ImageFont.truetype(str(font_path), int(size * 0.75))
    out.mkdir(parents=True, exist_ok=True)
    blank = Image.new("RGB", (size, size), "white").tobytes()
    items = []
    for caption, glyph in sorted(names.items()):
        path = out / f"{prefix}-{caption.replace(' ', '_')}.png"
        if not path.is_file():
            img = draw_glyph(font, glyph, size)
            if img.tobytes() == blank:
                continue
            img.save(path, format="PNG")
        items.append(EmojiImage(f"{prefix}:{caption}", str(path), (caption,)))
    return items


def _words(name: str) -> str:
    import re

    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return " ".join(re.sub(r"[-_]+", " ", name).lower().split())


def extra_collection(domain: str, out: Path):
    """Items (one caption each) of an extra-rows domain; pictures drawn to `out` once."""
    import importlib.util
    import json as _json
    import re

    from PIL import Image

    from retriever.demo.emoji import EmojiImage

    def pkg(name: str) -> Path:
        return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))

    if domain == "mdi":  # fonticon-materialdesignicons7 (Apache-2.0): every Material Design Icons glyph
        src = (pkg("fonticon_mdi7") / "mdi7.py").read_text()
        names = {}
        for attr, code in re.findall(r'^    (\w+) = "\\U([0-9a-fA-F]{8})"', src, flags=re.M):
            names[_words(attr)] = chr(int(code, 16))
        return _glyph_items("mdi", names, pkg("fonticon_mdi7") / "fonts" / "materialdesignicons-webfont.ttf", out)
    if domain in ("phosphor", "remix"):  # qtawesome's fonts (Phosphor: MIT; Remix Icon: Apache-2.0)
        fonts = pkg("qtawesome") / "fonts"
        stem = {"phosphor": "phosphor-1.3.0", "remix": "remixicon-2.5.0"}[domain]
        charmap = _json.loads((fonts / f"{stem.split('-')[0]}-charmap-{stem.split('-', 1)[1]}.json").read_text())
        names = {}
        for name, code in charmap.items():
            if domain == "phosphor":  # the regular weight only (bold/fill/light/thin/duotone are the same concept)
                if re.search(r"-(bold|fill|light|thin|duotone)$", name):
                    continue
            else:  # Remix: the outline ("-line") drawing of each concept; names without a variant as they are
                if name.endswith("-fill"):
                    continue
                name = name[: -len("-line")] if name.endswith("-line") else name
            names[_words(name)] = chr(int(code, 16))
        return _glyph_items(domain, names, fonts / f"{stem}.ttf", out)
    if domain == "arcade":  # Kenney's CC0 sprites shipped by `arcade`; one picture per distinct caption
        root = pkg("arcade") / "resources" / "assets" / "images"
        skip = {"backgrounds", "spritesheets", "test_textures", "cybercity_background", "miami_synth_parallax"}
        out.mkdir(parents=True, exist_ok=True)
        seen = {}
        for path in sorted(root.rglob("*.png")):
            if path.relative_to(root).parts[0] in skip:
                continue
            caption = _words(re.sub(r"\d+", " ", path.stem))
            if caption and caption not in seen:
                seen[caption] = path
        items = []
        for caption, path in seen.items():
            dst = out / f"arcade-{caption.replace(' ', '_')}.png"
            if not dst.is_file():
                img = Image.open(path).convert("RGBA")
                side = max(img.size)
                canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
                canvas.alpha_composite(img, ((side - img.width) // 2, (side - img.height) // 2))
                canvas.convert("RGB").save(dst, format="PNG")
            items.append(EmojiImage(f"arcade:{caption}", str(dst), (caption,)))
        return items
    raise ValueError(domain)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/quality")
    ap.add_argument("--views", type=int, default=8, help="augmented views per image besides the eval view")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--domain", default="emoji", choices=("emoji", "fontawesome", "openmoji", "symbola", *EXTRA_DOMAINS)
    )
    ap.add_argument("--plain-text", action="store_true", help="captions as they are only (no prompt templates)")
    ap.add_argument("--maps", action="store_true", help="also keep stage-5 maps (fp16), the last block's input")
    ap.add_argument("--image-tower", default=None, help="timm:NAME (default: the packaged EfficientNet-Lite0)")
    ap.add_argument("--image-weights", default=None, help="state dict for --image-tower")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retriever.data.images import load_image
    from retriever.demo.emoji import emoji_collection
    from retriever.demo.icons import fontawesome_collection
    from retriever.models.load import load_model
    from retriever.training.cache import geometric_view
    from retriever.training.start import compose_to_folder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init"
    if not (init / "open_clip_config.json").is_file():
        from retriever.models.compose import DEFAULT_IMAGE_TOWER, default_tower_paths

        torch.manual_seed(0)
        compose_to_folder(
            args.image_tower or DEFAULT_IMAGE_TOWER,
            f"hf:{default_tower_paths()[1]}",
            init,
            image_weights=args.image_weights,
            image_size=args.image_size,
        )
    encoder = load_model(f"local-dir:{init}", device="cpu", precision="fp32")
    model = encoder.model.eval()
    trunk = model.visual.trunk

    if args.domain == "fontawesome":
        items = fontawesome_collection(out / "png")
    elif args.domain in EXTRA_DOMAINS:  # extra training rows (quality_ablation --extra-features)
        items = extra_collection(args.domain, out / "png")
    else:
        items = emoji_collection()
    if args.domain == "openmoji":  # the same concepts, in order, drawn in OpenMoji's style
        from dataclasses import replace

        from retriever.demo.openmoji import openmoji_images

        drawn = openmoji_images(items, out / "png")
        assert len(drawn) == len(items), "OpenMoji lacks some emoji: the splits would not line up"
        items = [replace(it, path=drawn[it.char]) for it in items]
    present = None
    if args.domain == "symbola":  # a test-only third style: Symbola's black-and-white glyphs (Debian fonts-symbola)
        from dataclasses import replace

        drawn = symbola_images(items, out / "png")
        present = [it.char in drawn for it in items]
        items = [replace(it, path=drawn.get(it.char, items[0].path)) for it in items]
    from safetensors.torch import save_file

    # Text first, then one file per image view, so ablations can start on the eval view while the
    # augmented views are still being computed. A finished file is never recomputed.
    templates = ("{}",) if args.plain_text else TEMPLATES
    strings = sorted({t.format(c) for it in items for c in it.captions for t in templates})
    meta = {
        "items": [{"char": it.char, "path": it.path, "captions": list(it.captions)} for it in items],
        "strings": strings,
        "templates": list(templates),
        "stages": list(STAGES),
        "domain": args.domain,
        "present": present,  # symbola: which items the font draws (the others keep a placeholder)
    }
    (out / "features.json").write_text(json.dumps(meta, ensure_ascii=False))
    if not (out / "text.safetensors").is_file():
        from retriever.training.cache import split_towers, text_features

        t0 = time.perf_counter()
        model.requires_grad_(False)
        feats = text_features(encoder, split_towers(model), strings, batch_size=256)
        save_file({"text": feats.contiguous()}, str(out / "text.safetensors"))
        print(f"{len(strings)} strings: {time.perf_counter() - t0:.0f}s", flush=True)

    pictures = [load_image(it.path) for it in items]
    with torch.no_grad():
        for v in range(args.views + 1):
            path = out / f"view{v}.safetensors"
            if path.is_file():
                continue
            t0 = time.perf_counter()
            per_view: dict[str, list] = {s: [] for s in (*STAGES, "map5")}
            for s in range(0, len(items), 64):
                batch = []
                for j in range(s, min(s + 64, len(items))):
                    img = pictures[j] if v == 0 else geometric_view(pictures[j], 1_000_003 * v + j)
                    batch.append(encoder.preprocess(img))
                px = torch.stack(batch).contiguous(memory_format=torch.channels_last)
                staged = stage_features(trunk, px)
                if v == 0 and s == 0:  # the hand-written pass must equal the trunk's own pooled output
                    assert torch.allclose(staged["head"], trunk(px), atol=1e-4)
                for k, f in staged.items():
                    per_view[k].append(f)
            save_file({k: torch.cat(per_view[k]).contiguous() for k in STAGES}, str(path))
            if args.maps:
                save_file({"map5": torch.cat(per_view["map5"]).contiguous()}, str(out / f"maps{v}.safetensors"))
            print(f"view {v}: {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
