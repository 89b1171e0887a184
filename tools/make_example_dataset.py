#!/usr/bin/env python3
"""Regenerates the quickstart dataset in assets/example_dataset/.

The images are drawn by this script (no third-party content): a small toy
robot -- the "ohwx robot" the quickstart teaches -- on plain and striped
backgrounds, in different places, sizes and aspect ratios, so that
aspect-ratio bucketing and captions have something to do.

Usage (Pillow is the only requirement):
    python -m venv .venv && .venv/bin/pip install Pillow
    .venv/bin/python tools/make_example_dataset.py
"""
import random
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent / "assets" / "example_dataset"
SUBSET = ROOT / "10_ohwx robot"

BACKGROUNDS = [(236, 229, 206), (197, 224, 220), (230, 206, 214), (214, 222, 238), (242, 242, 242)]
CAPTIONS = {
    0: "ohwx robot, standing, beige background",
    2: "ohwx robot, small, in the corner",
    4: "ohwx robot, striped background",
    6: "ohwx robot, wide picture",
}


def robot(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float) -> None:
    """A red boxy robot with a round yellow head and an antenna, centred at (cx, cy)."""
    body = [cx - 0.5 * s, cy - 0.2 * s, cx + 0.5 * s, cy + 0.6 * s]
    draw.rectangle(body, fill=(200, 40, 40), outline=(60, 10, 10), width=max(1, int(s / 20)))
    draw.ellipse([cx - 0.3 * s, cy - 0.8 * s, cx + 0.3 * s, cy - 0.2 * s], fill=(240, 200, 40))
    draw.line([cx, cy - 0.8 * s, cx, cy - 1.0 * s], fill=(40, 40, 40), width=max(1, int(s / 25)))
    draw.ellipse([cx - 0.06 * s, cy - 1.08 * s, cx + 0.06 * s, cy - 0.96 * s], fill=(40, 40, 200))
    for ex in (-0.12, 0.12):
        draw.ellipse([cx + (ex - 0.05) * s, cy - 0.58 * s, cx + (ex + 0.05) * s, cy - 0.48 * s], fill=(20, 20, 20))
    draw.rectangle([cx - 0.4 * s, cy + 0.6 * s, cx - 0.15 * s, cy + 0.85 * s], fill=(90, 90, 90))
    draw.rectangle([cx + 0.15 * s, cy + 0.6 * s, cx + 0.4 * s, cy + 0.85 * s], fill=(90, 90, 90))


def main() -> None:
    rng = random.Random(1234)
    SUBSET.mkdir(parents=True, exist_ok=True)
    for old in SUBSET.iterdir():
        old.unlink()
    sizes = [(96, 96)] * 6 + [(128, 96), (96, 128)]
    for i, (w, h) in enumerate(sizes):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        if i == 4:
            for x in range(0, w, 12):
                d.rectangle([x, 0, x + 5, h], fill=tuple(max(0, c - 30) for c in bg))
        s = rng.uniform(0.28, 0.42) * min(w, h) if i != 2 else 0.2 * min(w, h)
        cx = rng.uniform(0.35, 0.65) * w if i != 2 else 0.78 * w
        cy = rng.uniform(0.45, 0.6) * h if i != 2 else 0.7 * h
        robot(d, cx, cy, s)
        img.save(SUBSET / f"robot_{i:02d}.png", optimize=True)
        if i in CAPTIONS:
            (SUBSET / f"robot_{i:02d}.txt").write_text(CAPTIONS[i] + "\n", encoding="utf-8")
    print(f"wrote {len(sizes)} images to {SUBSET}")


if __name__ == "__main__":
    main()
