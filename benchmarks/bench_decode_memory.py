"""Peak RSS of one decode worker on oversized images, with and without the --max-pixels guard.

Each case decodes one image and resizes it to 224 px in a fresh process (as a DataLoader
worker would) and reports that process's peak RSS (ru_maxrss). "main" is the code before issue 10
(full-size decode, Pillow's own guard only); "default" is load_image with DEFAULT_MAX_PIXELS and
JPEG draft decoding.

    PYTHONPATH=. python benchmarks/bench_decode_memory.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import resource, sys
from PIL import Image, ImageOps
from retriever.data.images import DEFAULT_MAX_PIXELS, load_image, to_rgb
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if sys.argv[2] == "main":  # the code before issue 10: full-size decode, Pillow's guard only
        img = Image.open(sys.argv[1]); img.load(); img = to_rgb(ImageOps.exif_transpose(img))
    else:
        img = load_image(sys.argv[1], DEFAULT_MAX_PIXELS)
    img.resize((224, 224), Image.BICUBIC)  # what the model's preprocessing does next
    outcome = "decoded at %dx%d" % img.size
except Exception as e:
    outcome = "refused: " + type(e).__name__
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, outcome)
"""

# The decode alone is measured (no model in the process): a worker's model-independent peak.


def make_images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    png = folder / "png-12000x12000.png"
    Image.new("L", (12000, 12000), 200).save(png, optimize=True)  # ~140 KB on disk, 144 MP
    jpg = folder / "jpeg-9000x9000.jpg"
    Image.new("RGB", (9000, 9000), (30, 120, 200)).save(jpg, quality=60)  # 81 MP
    return {"PNG 12000×12000 (144 MP)": png, "JPEG 9000×9000 (81 MP)": jpg}


def measure(path: Path, limit: str) -> tuple[float, float, str]:
    cmd = [sys.executable, "-c", WORKER, str(path), limit]
    out = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, check=True).stdout
    base, peak, *outcome = out.split()
    return (int(peak) - int(base)) / 1024, int(peak) / 1024, " ".join(outcome)  # MiB: added by the decode, peak


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in make_images(Path(tmp)).items():
            for limit in ("main", "default"):
                mib, peak, outcome = measure(path, limit)
                rows.append(
                    {
                        "image": name,
                        "bytes": path.stat().st_size,
                        "limit": limit,
                        "decode_rss_mib": round(mib),
                        "peak_rss_mib": round(peak),
                        "outcome": outcome,
                    }
                )
    print(f"{'image':<26} {'file':>9} {'code':>8} {'RSS added by decode':>20} {'process peak':>13}  outcome")
    for r in rows:
        print(
            f"{r['image']:<26} {r['bytes'] / 1024:>7.0f}KB {r['limit']:>8} {r['decode_rss_mib']:>16} MiB "
            f"{r['peak_rss_mib']:>9} MiB  {r['outcome']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
