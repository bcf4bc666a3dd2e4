"""The dataset health report: what is likely to hurt a training before any GPU time is spent.

Duplicates and near-duplicates (a perceptual hash: 64-bit dHash plus an 8x8 colour thumbnail, Pillow and numpy),
tiny and huge images, aspect ratios and the bucket histogram the trainer would use (data/buckets.py with the
default bucket settings), caption lengths in CLIP tokens against kohya's 75 / 150 / 225 limits, tag frequencies,
images without captions, and files whose content is not what their extension says. Torch-free: it runs in the
WebUI's process and in the API's thread pool. Every file path in the report is relative to the dataset folder.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kohya_backend.data.images import BadImageError, open_image, probe_image, to_rgb, upright_image
from kohya_backend.data.preprocess import bucket_assigner
from kohya_backend.data.scan import check_caption_extension, list_dataset
from kohya_backend.data.token_count import token_counter

TOKEN_LIMITS = (75, 150, 225)  # kohya's max_token_length choices (75 is the default)
NEAR_BITS = 6  # dHash bits two near-duplicates may differ in (of 64)
NEAR_COLOUR = 12.0  # mean absolute difference of their 8x8 RGB thumbnails (0-255)
SHOWN = 10  # files listed per finding (the counts are complete)
_JPEG = (".jpg", ".jpeg", ".jpe", ".jfif")
_FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": _JPEG,
    "MPO": _JPEG,  # a JPEG with more pictures inside (phones and cameras write them)
    "WEBP": (".webp",),
    "BMP": (".bmp", ".dib"),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass
class _Image:
    """What the report needs of one image: where, size, format, hashes, caption."""

    name: str
    width: int
    height: int
    format: str | None
    sha256: str
    dhash: int
    colour: np.ndarray = field(repr=False)
    caption: str | None
    caption_file: bool  # a caption file exists (None caption with a file: it is empty)


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash: each bit says whether a pixel of a 9x8 grey thumbnail is brighter than its
    right neighbour. Similar pictures (rescaled, recompressed, slightly edited) differ in few bits."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """How many of the 64 hash bits differ."""
    return (a ^ b).bit_count()


def _read(path: Path, name: str, caption: str | None, caption_file: bool) -> _Image:
    """Hash and measure one image (decoded once, reduced early: JPEG's draft mode skips most of the work)."""
    width, height = probe_image(path, full_decode=False)  # upright size from the header
    data = path.read_bytes()
    with open_image(path) as image:
        fmt = image.format
        image.draft("RGB", (64, 64))
        small = to_rgb(upright_image(image, path)).resize((32, 32), Image.Resampling.BOX)
    colour = np.asarray(small.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return _Image(
        name,
        width,
        height,
        fmt,
        hashlib.sha256(data).hexdigest(),
        dhash(small),
        colour,
        caption,
        caption_file,
    )


def _groups(pairs: Iterable[tuple[int, int]], count: int) -> list[list[int]]:
    """Connected groups of indices linked by `pairs` (union-find), each sorted, groups of 2+ only."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    found: dict[int, list[int]] = {}
    for i in range(count):
        found.setdefault(root(i), []).append(i)
    return sorted((g for g in found.values() if len(g) > 1), key=lambda g: g[0])


def _near_pairs(images: list[_Image]) -> list[tuple[int, int]]:
    """Pairs whose dHashes differ in at most NEAR_BITS bits and whose colours match (a uniform red and a uniform
    blue picture share a dHash, not their colours)."""
    hashes = np.array([i.dhash for i in images], dtype=np.uint64)
    pairs = []
    for a in range(len(images) - 1):
        rest = (hashes[a + 1 :] ^ hashes[a]).view(np.uint8).reshape(-1, 8)
        distance = _POPCOUNT[rest].sum(axis=1, dtype=np.int32)
        for offset in np.nonzero(distance <= NEAR_BITS)[0]:
            b = a + 1 + int(offset)
            if float(np.abs(images[a].colour - images[b].colour).mean()) <= NEAR_COLOUR:
                pairs.append((a, b))
    return pairs


def _duplicates(images: list[_Image]) -> dict[str, Any]:
    by_content: dict[str, list[int]] = {}
    for index, image in enumerate(images):
        by_content.setdefault(image.sha256, []).append(index)
    exact = [g for g in by_content.values() if len(g) > 1]
    same_file = {frozenset(g) for g in exact}
    near = [g for g in _groups(_near_pairs(images), len(images)) if frozenset(g) not in same_file]
    return {
        "identical": [[images[i].name for i in g] for g in sorted(exact)],
        "near": [[images[i].name for i in g] for g in near],
    }


def _sizes(images: list[_Image], resolution: int) -> dict[str, Any]:
    area = resolution * resolution
    tiny = [i for i in images if i.width * i.height < area / 4]
    huge = [i for i in images if i.width * i.height > area * 16]
    listed = lambda found: [{"file": i.name, "width": i.width, "height": i.height} for i in found[:SHOWN]]  # noqa: E731
    return {
        "tiny_below": f"{resolution // 2}x{resolution // 2} pixels (upscaled more than 2x)",
        "tiny": len(tiny),
        "tiny_files": listed(tiny),
        "huge_above": f"{resolution * 4}x{resolution * 4} pixels (slow to load; preprocess to the resolution)",
        "huge": len(huge),
        "huge_files": listed(huge),
        "smallest": min(((i.width, i.height) for i in images), key=lambda s: s[0] * s[1], default=None),
        "largest": max(((i.width, i.height) for i in images), key=lambda s: s[0] * s[1], default=None),
    }


def _aspects(images: list[_Image], resolution: int) -> dict[str, Any]:
    ratios = [i.width / i.height for i in images]
    assigner = bucket_assigner(resolution)
    buckets = Counter(assigner.assign(i.width, i.height) for i in images)
    extreme = [i for i, r in zip(images, ratios) if r > 2.5 or r < 0.4]
    return {
        "portrait": sum(1 for r in ratios if r < 0.95),
        "square": sum(1 for r in ratios if 0.95 <= r <= 1.05),
        "landscape": sum(1 for r in ratios if r > 1.05),
        "extreme": len(extreme),
        "extreme_files": [i.name for i in extreme[:SHOWN]],
        "buckets": [
            {"width": w, "height": h, "images": n}
            for (w, h), n in sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "bucket_settings": f"resolution {resolution}, bucketing on, the schema's default bucket sizes",
    }


def _captions(images: list[_Image], count: Callable[[str], int], method: str) -> dict[str, Any]:
    missing = [i.name for i in images if i.caption is None and not i.caption_file]
    empty = [i.name for i in images if i.caption is None and i.caption_file]
    lengths = sorted(((count(i.caption), i.name) for i in images if i.caption), reverse=True)
    tokens = [n for n, _ in lengths]
    over = {str(limit): sum(1 for n in tokens if n > limit) for limit in TOKEN_LIMITS}
    return {
        "missing": len(missing),
        "missing_files": missing[:SHOWN],
        "empty": len(empty),
        "empty_files": empty[:SHOWN],
        "tokens_counted_with": method,
        "max_tokens": tokens[0] if tokens else 0,
        "mean_tokens": round(sum(tokens) / len(tokens), 1) if tokens else 0,
        "over": over,
        "longest": [{"file": name, "tokens": n} for n, name in lengths[:SHOWN] if n > TOKEN_LIMITS[0]],
    }


def _tags(images: list[_Image]) -> dict[str, Any]:
    counts = Counter(tag.strip() for i in images for tag in (i.caption or "").split(",") if tag.strip())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    most = ranked[:SHOWN]
    least = sorted(ranked[SHOWN:], key=lambda kv: (kv[1], kv[0]))[
        :SHOWN
    ]  # never a tag already listed as most
    return {
        "distinct": len(counts),
        "most_common": [{"tag": t, "images": n} for t, n in most],
        "least_common": [{"tag": t, "images": n} for t, n in least],
    }


def _extensions(images: list[_Image]) -> list[dict[str, str]]:
    wrong = []
    for image in images:
        suffix = Path(image.name).suffix.lower()
        allowed = _FORMATS.get(image.format or "", ())
        if image.format and suffix not in allowed:
            wrong.append({"file": image.name, "extension": suffix, "content": image.format})
    return wrong


def dataset_health(folder: Path, caption_extension: str = ".txt", *, resolution: int = 512) -> dict[str, Any]:
    """The health report of a kohya dataset folder (its `<repeats>_<name>` subfolders) for training at
    `resolution` (512 for SD 1.5, 1024 for SDXL). Unreadable images are listed, not raised."""
    extension = check_caption_extension(caption_extension)
    listing = list_dataset(folder, extension, verify_images=False)
    images: list[_Image] = []
    unreadable = []
    for listed in sorted(listing.images, key=lambda i: i.path.as_posix()):
        name = listed.path.relative_to(folder).as_posix()
        try:
            caption_file = listed.path.with_name(listed.path.stem + extension).is_file()
            images.append(_read(listed.path, name, listed.caption, caption_file))
        except (BadImageError, OSError) as exc:
            unreadable.append({"file": name, "reason": getattr(exc, "message", None) or str(exc)})
    count, method = token_counter()
    return {
        "images": len(images),
        "resolution": resolution,
        "unreadable": unreadable,
        "duplicates": _duplicates(images),
        "sizes": _sizes(images, resolution),
        "aspect_ratios": _aspects(images, resolution),
        "captions": _captions(images, count, method),
        "tags": _tags(images),
        "mismatched_extensions": _extensions(images),
    }
