"""Image loading, InternVL "dynamic" tiling and ImageNet normalisation, as Long-VITA preprocesses images.

Source: InternVL's dynamic_preprocess (candidate grids, closest aspect ratio, area tie rule) with
Long-VITA's choice of putting the thumbnail FIRST; Long-VITA's per-tile processing (pad to a square with
the mean colour, bicubic resize, x * 1.0 / 255.0, (x - mean) / std in float32). Pillow + numpy only.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# The most tiles one image may be cut into: a 2^20-token context holds 4096 448-px tiles. It bounds the
# work of a --max-tiles request (the resized image is up to ~max_tiles * 448^2 pixels).
MAX_TILES = 4096
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_FILL = tuple(int(m * 255) for m in IMAGENET_MEAN)  # (123, 116, 103): padding colour
_MEAN32 = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD32 = np.array(IMAGENET_STD, dtype=np.float32)

ImageLike = Union[str, "os.PathLike[str]", Image.Image]


def load_image(image: ImageLike) -> Image.Image:
    """Open an image file (or take a PIL image) and return it in RGB mode (PIL.Image, uint8).

    16-bit greyscale ("I;16*", or "I" holding 16-bit values) is scaled to 8 bits (x / 257), and float
    ("F") images holding [0, 1] are scaled by 255; Pillow's own RGB conversion would clip them (a
    16-bit image would come out white). Other modes use Pillow's conversion, as Long-VITA does.
    Raises FileNotFoundError naming the path if it does not exist, and
    ValueError("cannot read image <path>: <reason>") if Pillow cannot decode it (a decompression bomb,
    i.e. more than twice Pillow's MAX_IMAGE_PIXELS, included)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else to_rgb(image)
    path = os.fspath(image)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure on a file is "cannot read it"
        raise ValueError(f"cannot read image {path}: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__) if isinstance(e, (OSError, ValueError)) else \
        f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB uint8 view of any Pillow mode, scaling high-bit-depth greyscale instead of clipping it."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        x = np.asarray(image, dtype=np.float64)
        finite = x[np.isfinite(x)]
        top = float(finite.max()) if finite.size else 0.0
        if image.mode == "F" and top <= 1.0:
            x = x * 255.0
        elif image.mode != "F" and (image.mode.startswith("I;16") or top > 255.0):
            x = x / 257.0  # 65535 -> 255
        grey = np.clip(np.nan_to_num(np.rint(x)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> list[tuple[int, int]]:
    """Tile grids (cols, rows) with min_tiles <= cols*rows <= max_tiles, sorted by cols*rows.

    Ties (same product) keep CPython's set-iteration order, exactly as InternVL/Long-VITA build them (a
    set filled by ``for n in range(min, max + 1): for i in 1..n: for j in 1..n``, then a stable sort
    by i*j). A set's order depends only on the order in which its elements are FIRST added, so the
    same set is built here from the first-insertion order alone -- O(max_tiles log max_tiles) pairs
    instead of InternVL's cubic loop. Raises ValueError unless 1 <= min_tiles <= max_tiles <= MAX_TILES."""
    if not (1 <= min_tiles <= max_tiles <= MAX_TILES):
        raise ValueError(f"tile limits: expected 1 <= min_tiles <= max_tiles <= {MAX_TILES}, received "
                         f"{min_tiles}, {max_tiles}")
    grids: set[tuple[int, int]] = set()
    for n in range(min_tiles, max_tiles + 1):
        # pairs first met at this n, in InternVL's (i, j) order: all of [1, n]^2 at the first n, then
        # those with max(i, j) == n (i < n with j = n, then i = n with j <= n)
        if n == min_tiles:
            new = ((i, j) for i in range(1, n + 1) for j in range(1, n + 1))
        else:
            new = [(i, n) for i in range(1, min(n - 1, max_tiles // n) + 1)]
            new += [(n, j) for j in range(1, min(n, max_tiles // n) + 1)]
        grids.update(g for g in new if min_tiles <= g[0] * g[1] <= max_tiles)
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: Sequence[tuple[int, int]], image_size: int) -> tuple[int, int]:
    """The grid (cols, rows) whose cols/rows is closest to width/height (pixels).

    Exact ties in |difference| (float compare) go to a later grid when the image area exceeds
    0.5 * image_size^2 * cols * rows (InternVL's rule: big images get more tiles)."""
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * image_size * image_size * grid[0] * grid[1]:
            best = grid
    return best


def dynamic_tiles(image: Image.Image, image_size: int = 448, max_tiles: int = 12,
                  min_tiles: int = 1) -> tuple[list[Image.Image], tuple[int, int]]:
    """Cut an image into image_size x image_size tiles (InternVL dynamic preprocessing, Long-VITA order).

    The whole image is resized (bicubic, aspect not preserved) to (image_size*cols, image_size*rows) for
    the grid chosen by `closest_grid`, then cut row by row (tile k at column k % cols, row k // cols).
    With more than one tile, a thumbnail (whole image resized bicubic to image_size^2) comes FIRST.
    Returns (tiles: list of PIL RGB images, length cols*rows (+1 with thumbnail), (cols, rows)).
    Raises ValueError for an empty image or bad tile limits."""
    if not (1 <= min_tiles <= max_tiles):
        raise ValueError(f"tile limits: expected 1 <= min_tiles <= max_tiles, received {min_tiles}, {max_tiles}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image: expected a non-empty image, received size {image.size}")
    cols, rows = closest_grid(width, height, candidate_grids(min_tiles, max_tiles), image_size)
    resized = image.resize((image_size * cols, image_size * rows), resample=Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if len(tiles) > 1:
        tiles.insert(0, image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC))
    return tiles, (cols, rows)


def expand_to_square(image: Image.Image, fill: tuple[int, ...] = MEAN_FILL) -> Image.Image:
    """Pad an image to a square of side max(w, h) with colour `fill`, the image centred (offset floored:
    ((W - w) // 2, (H - h) // 2)). Square images are returned unchanged (same object)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


def prepare_tile(image: Image.Image, image_size: int) -> Image.Image:
    """Long-VITA's per-tile geometry: RGB, pad to square with the mean colour, bicubic resize to
    image_size^2 (both no-ops for a tile that is already image_size^2)."""
    image = expand_to_square(image.convert("RGB") if image.mode != "RGB" else image, MEAN_FILL)
    return image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)


def normalize_tile(tile: Image.Image) -> np.ndarray:
    """One RGB tile -> float32 array [3, h, w]: x = x * 1.0 / 255.0, then (x - mean) / std with the
    ImageNet mean/std as float32 arrays (float32 arithmetic in that order, as Long-VITA)."""
    x = np.asarray(tile.convert("RGB") if tile.mode != "RGB" else tile, dtype=np.float32)
    x = x * 1.0 / 255.0
    x = (x - _MEAN32) / _STD32
    return x.transpose(2, 0, 1)


def normalize(tiles: Sequence[Image.Image], out: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalise equally sized RGB tiles into a tensor [n, 3, h, w] (`dtype`, default float32, CPU).

    Each tile: uint8 HWC -> float32, x * 1.0 / 255.0, (x - mean) / std (ImageNet), -> CHW; the values are
    computed in float32 and cast to `dtype` only when stored. If `out` ([n, 3, h, w]) is given the
    tiles are written into it (no second copy) and it is returned. Raises ValueError on size mismatch."""
    tiles = list(tiles)
    if not tiles:
        if out is not None:
            return out
        raise ValueError("tiles: expected at least one tile (the spatial size is unknown otherwise)")
    w, h = tiles[0].size
    if out is None:
        out = torch.empty((len(tiles), 3, h, w), dtype=dtype)
    if tuple(out.shape) != (len(tiles), 3, h, w):
        raise ValueError(f"out: expected shape {(len(tiles), 3, h, w)}, received {tuple(out.shape)}")
    for k, tile in enumerate(tiles):
        if tile.size != (w, h):
            raise ValueError(f"tiles[{k}]: expected size {(w, h)}, received {tile.size}")
        out[k].copy_(torch.from_numpy(normalize_tile(tile)))
    return out


def image_to_tensor(image: ImageLike, image_size: int = 448, max_tiles: int = 12, min_tiles: int = 1,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, tuple[int, int]]:
    """load_image + dynamic_tiles + normalize: returns (pixel_values [tiles, 3, s, s], (cols, rows))."""
    tiles, grid = dynamic_tiles(load_image(image), image_size, max_tiles, min_tiles)
    return normalize([prepare_tile(t, image_size) for t in tiles], dtype=dtype), grid
