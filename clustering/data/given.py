"""Images as a user gives them to the Python API, turned into what the model reads.

Accepted:
- an array (N, H, W), (N, H, W, C) or (N, C, H, W);
- flat rows (N, H*W[*C]) with `image_shape`, or of a perfect square side (said in a warning);
- one image: a square 2-D array, or [image];
- a list of arrays, file paths or s3:// URIs, encoded bytes, or PIL images (each file read once).
Values: uint8, floats in 0..1 and integers in 0..255 are pixels; others are mapped linearly from their range onto
0..255 with a warning (`to_uint8`); NaN and infinity are refused. All go through the shards' input policy
(shards.POLICY) to the model's mode and side.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from . import shards, storage


def flat_rows(x: np.ndarray, image_shape: tuple[int, ...] | None) -> np.ndarray:
    """A 2-D array as images: flat rows (N, D) reshaped to `image_shape`, or to squares when D is a perfect square
    (said in a warning); a square array (H, H) is one image. Rows that form no image are refused, saying how."""
    if image_shape is not None:
        if int(np.prod(image_shape)) != x.shape[1]:
            raise ValueError(f"image_shape {tuple(image_shape)} holds {int(np.prod(image_shape))} values, and each row "
                             f"has {x.shape[1]}")
        return x.reshape(len(x), *image_shape)
    if x.shape[0] == x.shape[1]:
        return x[None]  # one (H, H) image
    side = math.isqrt(x.shape[1])
    if side * side == x.shape[1] and side >= 2:
        warnings.warn(f"taking the {x.shape[0]} rows of {x.shape[1]} values as {side}x{side} images (pass "
                      "image_shape= to say otherwise)", stacklevel=4)
        return x.reshape(len(x), side, side)
    raise ValueError(f"a 2-D array of {x.shape[0]} rows of {x.shape[1]} values: rows of images need "
                     "image_shape=(H, W) or (H, W, C); one image of another shape goes as [image] or image[None]")


def _as_pil(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        a = to_uint8(image_array(item[None]))[0]
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    return Image.open(io.BytesIO(_as_bytes(item)))


def _as_bytes(item: Any) -> bytes:
    """An encoded image's bytes: given, or read from a path or URI (naming it when it cannot be read)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if not isinstance(item, (str, os.PathLike)):
        raise ValueError(f"an image must be an array, a PIL image, encoded bytes, or a path or URI; got "
                         f"{type(item).__name__}")
    return storage.read_bytes(str(item))


def as_inputs(images: Any, image_shape: tuple[int, ...] | None = None) -> Any:
    """Images as given, in a form read once: an array stays one (a list of same-shape arrays becomes one; array-likes,
    nested lists of numbers and sparse input go through scikit-learn's check_array: sparse is refused), PIL images
    stay open, paths and URIs are read into bytes."""
    from sklearn.utils.validation import check_array

    nested = isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple))
    if nested or (not isinstance(images, (np.ndarray, list, tuple, Image.Image, str, bytes, os.PathLike))
                  and (hasattr(images, "__array__") or hasattr(images, "toarray"))):
        images = check_array(images, accept_sparse=False, allow_nd=True, dtype="numeric", ensure_all_finite=False)
    if isinstance(images, np.ndarray):
        if images.ndim == 1:
            raise ValueError(f"images must be 2-D at least; got one row of {len(images)} values (reshape(1, -1) "
                             "for one flat image)")
        return flat_rows(images, image_shape) if images.ndim == 2 else images
    if isinstance(images, (Image.Image, str, bytes, os.PathLike)):
        images = [images]  # one image
    items = list(images)
    if not items:
        raise ValueError("no images given")
    if all(isinstance(i, np.ndarray) for i in items) and len({i.shape for i in items}) == 1:
        return np.stack(items)
    return [i if isinstance(i, Image.Image) else _as_pil(i) if isinstance(i, np.ndarray) else _as_bytes(i)
            for i in items]


def image_array(images: np.ndarray) -> np.ndarray:
    """An array of images as (N, H, W, C) numbers, checked: finite, not empty, a known layout."""
    from sklearn.utils.validation import check_array

    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] in (1, 3, 4) and len(images):
        return images  # pixels in their layout already: nothing to check (fit passes them on so)
    x = check_array(images, allow_nd=True, dtype="numeric", ensure_all_finite=False, ensure_min_samples=1)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or 0 in x.shape:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1, 3 or 4; got {x.shape}")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"images must be numbers (uint8, or floats in 0..1); got dtype {x.dtype}")
    finite = np.isfinite(x).reshape(len(x), -1).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{len(bad)} of {len(x)} images hold NaN or infinite values (the first: image {bad[0]}): "
                         "clean or drop them first")
    return x


def data_range(x: np.ndarray) -> tuple[float, float] | None:
    """None where the values are pixels as they are (uint8, integers in 0..255, floats in 0..1); else their
    (min, max), which `to_uint8` maps onto 0..255."""
    lo, hi = float(x.min()), float(x.max())
    if x.dtype == np.uint8 or (x.dtype.kind == "f" and 0 <= lo and hi <= 1) or \
            (x.dtype.kind in "biu" and 0 <= lo and hi <= 255):
        return None
    return lo, hi


def to_uint8(x: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(N, H, W, C) numbers -> uint8. uint8 stays; floats in 0..1 are x 255; integers in 0..255 stay. Anything else
    is mapped linearly from `value_range` (the range found when the model was fitted) or, without one, from its own
    min..max, with a warning naming the range: never a silent mis-scale (load_digits().images run 0..16)."""
    if x.dtype == np.uint8:
        return x
    found = data_range(x)
    lo, hi = value_range or found or (0.0, 1.0 if x.dtype.kind == "f" else 255.0)
    if found and not value_range:
        warnings.warn(f"the images' values run {lo:g}..{hi:g}, not 0..1 (floats) or 0..255: mapped linearly from "
                      f"{lo:g}..{hi:g} onto 0..255", stacklevel=4)
    scaled = (x.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def shapes_of(images: Any) -> Counter:
    """(height, width, mode) counts of the images, as the shard job records them (headers only for files)."""
    if isinstance(images, np.ndarray):
        x = image_array(images)
        return Counter({(x.shape[1], x.shape[2], {1: "L", 3: "RGB", 4: "RGBA"}[x.shape[3]]): len(x)})
    shapes = Counter()
    for item in images:
        im = _as_pil(item)
        shapes[(im.height, im.width, im.mode)] += 1
        if im is not item:
            im.close()  # opened here from bytes: the caller's own images stay open
    return shapes


def to_images(images: Any, mode: str, side: int, image_shape: tuple[int, ...] | None = None,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Images of any accepted kind -> uint8 (N, side, side, C) by the input policy; arrays of other values mapped
    from `value_range` (`to_uint8`)."""
    images = as_inputs(images, image_shape)
    if isinstance(images, np.ndarray):
        x = to_uint8(image_array(images), value_range)
        if x.shape[1:] == (side, side, 1 if mode == "L" else 3):
            return x
        return np.stack([shards.apply_policy(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), mode, side)
                         for a in x])
    out = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(shards.apply_policy(item, mode, side))
        else:
            out.append(shards.decode_image(item, mode, side))
    return np.stack(out)


