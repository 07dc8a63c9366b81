"""Readers of inputs: image folders (JPEG/PNG/...), MNIST IDX files, NPZ arrays and scikit-learn's digits.

A source is planned once (`plan()`: cheap items with stable keys) and read in parallel tasks (`load(item)`: the
encoded image bytes); the shard job lists and plans a folder tree in tasks instead (`walk_images`, `folder_items`).
Keys derive from the source path, so outputs join back to inputs and a re-run gives the same keys.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import storage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ORIGINAL_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}  # kept byte for byte; others re-encode to PNG


class SourceError(ValueError):
    """An input that cannot be sharded at all; the message names it and says what to do."""


class BadImage(ValueError):
    """One unreadable input: counted and skipped, reported at the end."""


# Shards hold 8-bit L or RGB images only; every other PIL mode is converted once, when sharding, by this rule.
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MODE_RULE = ("16-bit gray: its full range onto 0..255; 32-bit int or float gray: its own min..max onto 0..255 "
             "(a float image within 0..1: x255); transparency: composited onto white; palette, CMYK, YCbCr: RGB")


def to_8bit(im: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit L or RGB, by MODE_RULE."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
            a = a / 257.0
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif lo < 0 or hi > 255:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("L" if im.mode in ("LA", "La") else "RGB")
    return im.convert("L" if im.mode in GRAY_MODES else "RGB")


@dataclass(frozen=True, slots=True)
class Item:
    key: str  # stable, unique, no dots (WebDataset splits key and extension at the first dot)
    ref: str | int  # file URI or array row
    nbytes: int
    label: int | None = None


@dataclass
class Decoded:
    data: bytes
    ext: str
    width: int
    height: int
    mode: str  # PIL mode: L, RGB, ...


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sanitize_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_/-]", "_", text).strip("/")


@dataclass
class ArraySource:
    """In-memory uint8 images (N, H, W) or (N, H, W, C) with optional labels; encoded losslessly as PNG."""

    uri: str
    prefix: str
    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    splits: list[tuple[str, int]] | None = None  # consecutive (name, count) runs, e.g. MNIST's train and t10k

    def plan(self) -> list[Item]:
        """Keys like mnist/train/000123: they name the file and row each image came from."""
        per = int(np.prod(self.images.shape[1:]))
        items, start = [], 0
        for split, n in self.splits or [(None, len(self.images))]:
            base = f"{self.prefix}/{split}" if split else self.prefix
            for j in range(n):
                label = None if self.labels is None else int(self.labels[start + j])
                items.append(Item(f"{base}/{j:06d}", start + j, per, label))
            start += n
        return items

    def load(self, item: Item, verify: bool = True) -> Decoded:
        img = self.images[item.ref]
        h, w = img.shape[:2]
        return Decoded(png_bytes(img), "png", w, h, "L" if img.ndim == 2 else "RGB")

    def describe(self, item: Item) -> str:
        return f"{self.uri}#{item.ref}"


@dataclass
class Listing:
    """What a walk of (part of) a folder tree found."""
    files: list[tuple[str, int]] = field(default_factory=list)  # (path relative to the root, size) of images, sorted
    hidden: list[str] = field(default_factory=list)  # relative names of hidden files and folders left out
    unlisted: list[str] = field(default_factory=list)  # what the listing saw but cannot read: counted as skipped
    listed: int = 0  # files seen, images or not
    folders: list[str] = field(default_factory=list)  # with top_only: the subfolders (relative), not walked


def walk_images(uri: str, subs: tuple[str, ...] = ("",), top_only: bool = False) -> Listing:
    """The image files under `uri` (in its subfolders `subs`; with top_only, its own files and the names of its
    subfolders). Hidden names (a leading dot: .git, .DS_Store, ._x.jpg) are not read, and are counted in `hidden`.
    Symlinked files are read; symlinked folders are not followed, so a link loop cannot make the listing endless.
    Folder by folder (fs.walk), keeping only (path, size) of images: ~100 bytes a file."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    out = Listing()
    for sub in subs:
        start = f"{root}/{sub}" if sub else root
        for folder, dirs, found in fs.walk(start, detail=True, maxdepth=1 if top_only else None):  # top-down:
            rel = folder[len(root) + 1:]  # deleting from dirs prunes the walk
            if "" in found or "" in dirs:  # an S3 key with '//' lists as an empty name here and cannot be read
                out.unlisted.append(f"{uri.rstrip('/')}/{rel}/ holds a key with an empty path segment ('//'), "
                                    "which a folder listing cannot reach: rename it")
                found.pop("", None)
                dirs.pop("", None)
            for name in [d for d in dirs if d.startswith(".")] + [f for f in found if f.startswith(".")]:
                out.hidden.append(f"{rel}/{name}" if rel else name)
                dirs.pop(name, None)
                found.pop(name, None)
            for name in [f for f, info in found.items() if not regular(info)]:  # a pipe would block a read
                out.unlisted.append(f"{uri.rstrip('/')}/{rel + '/' if rel else ''}{name}: not a regular file (a pipe, "
                                    "socket or device), not read")
                found.pop(name)
            if top_only:
                out.folders += sorted(f"{rel}/{d}" if rel else d for d in dirs)
            out.listed += len(found)
            out.files += [(f"{rel}/{name}" if rel else name, int(info.get("size") or 0)) for name, info in found.items()
                          if PurePosixPath(name).suffix.lower() in IMAGE_EXTS]
    out.files.sort()
    return out


def regular(info: dict) -> bool:
    """Whether a listed entry reads as a file: a regular file, or a link to one (a dangling link reads as an error,
    counted when read). A pipe, socket or device would block or mislead a read."""
    if info.get("type") == "file":
        return True
    if not info.get("islink"):
        return False
    try:
        return stat.S_ISREG(os.stat(info["name"]).st_mode)
    except OSError:
        return True  # dangling: its read fails, and is counted


def no_images(uri: str, listed: int) -> SourceError:
    return SourceError(f"source {uri!r} holds no image files (looked for {', '.join(sorted(IMAGE_EXTS))} "
                       f"among {listed} files): point it at a folder of images")


def parent_names(rels) -> tuple[set[str], bool]:
    """(the names of the files' parent folders, whether any file lies below the root): a folder tree's classes."""
    parents = {PurePosixPath(rel).parent for rel in rels}
    return {p.name for p in parents}, any(str(p) != "." for p in parents)


def folder_items(uri: str, files: list[tuple[str, int, str]], classes: list[str] | None) -> list[Item]:
    """Items of a folder tree's (relative path, size, key): a file's parent folder name is its label."""
    index = {c: i for i, c in enumerate(classes or [])}
    items = []
    for rel, size, key in files:
        path = PurePosixPath(rel)
        label = index[path.parent.name] if classes and str(path.parent) != "." else None
        items.append(Item(key, storage.join(uri, rel), size, label))
    return items


@dataclass
class FolderSource:
    """A folder tree of image files, listed in this process (`walk_images`); a file's parent folder name (below the
    root) becomes its label. (The shard job lists a folder in parallel tasks instead: jobs/shard.py.)"""

    uri: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (relative path, size)
    classes: list[str] | None = None
    hidden: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)

    def __post_init__(self):
        fs, root = storage.filesystem(self.uri)
        if not fs.exists(root):
            raise SourceError(f"source {self.uri!r} does not exist: give an image folder, MNIST IDX files, a .npz or sklearn:digits")
        listing = walk_images(self.uri)
        self.files, self.hidden, self.unlisted = listing.files, listing.hidden, listing.unlisted
        if not self.files:
            raise no_images(self.uri, listing.listed)
        names, nested = parent_names(rel for rel, _ in self.files)
        if nested:
            self.classes = sorted(names)

    def plan(self) -> list[Item]:
        keys = unique_keys([rel for rel, _ in self.files])
        return folder_items(self.uri, [(rel, size, key) for (rel, size), key in zip(self.files, keys)], self.classes)

    def load(self, item: Item, verify: bool = True) -> Decoded:
        return load_file(str(item.ref), verify)

    def describe(self, item: Item) -> str:
        return str(item.ref)


def load_file(uri: str, verify: bool = True) -> Decoded:
    """An image file's bytes as they are when it is an 8-bit L or RGB JPEG/PNG; any other format or mode is
    converted (to_8bit) and re-encoded losslessly as PNG. `mode` is the file's own, for the manifest. With
    verify=False a JPEG/PNG is not decoded here: the caller decodes it next (shard.store=resized, at draft scale)."""
    raw = storage.read_bytes(uri)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if verify or im.format not in ("JPEG", "PNG") or im.mode not in ("L", "RGB"):
                im.load()  # decodes fully: catches truncated files, not just bad headers
            w, h, mode = im.width, im.height, im.mode
            ext = ORIGINAL_EXTS.get(PurePosixPath(uri).suffix.lower())
            kept = (ext == "jpg" and im.format == "JPEG") or (ext == "png" and im.format == "PNG")
            if not kept or mode not in ("L", "RGB"):
                raw, ext = png_bytes(np.asarray(to_8bit(im))), "png"
    except Image.DecompressionBombError as e:
        raise BadImage(f"{uri}: too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{uri}: not a readable image ({type(e).__name__}: {e})") from None
    return Decoded(raw, ext, w, h, mode)


def unique_keys(paths: list[str]) -> list[str]:
    """Stable keys for relative paths: the path without its extension, sanitised (WebDataset splits a key from its
    extension at the first dot); a clash (a.jpg beside a.png) gets a short hash of the path."""
    keys, seen = [], set()
    for rel in paths:
        key = sanitize_key(str(PurePosixPath(rel).with_suffix("")))
        if key in seen:
            key = f"{key}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        seen.add(key)
        keys.append(key)
    return keys


@dataclass
class FileListSource:
    """Image files named one by one (paths or URIs); keys are their names without the extension."""

    uris: list[str]

    def plan(self) -> list[Item]:
        names = [PurePosixPath(u.split("://", 1)[-1]).name for u in self.uris]
        return [Item(key, uri, 0) for key, uri in zip(unique_keys(names), self.uris)]

    def load(self, item: Item, verify: bool = True) -> Decoded:
        return load_file(str(item.ref), verify)

    def describe(self, item: Item) -> str:
        return str(item.ref)


def read_idx(uri: str) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzip-compressed or raw."""
    raw = storage.read_bytes(uri)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SourceError(f"{uri} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{uri}: IDX header says {tuple(dims)} but holds {data.size} bytes (truncated?)")
    return data.reshape(dims)


def idx_source(uri: str) -> ArraySource:
    """A folder with *-images-idx3-ubyte[.gz] files (and matching *-labels-idx1-ubyte[.gz]), or one images file."""
    fs, path = storage.filesystem(uri)
    names = sorted(fs.find(path)) if fs.isdir(path) else [path]
    proto = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    image_files = [n for n in names if "images-idx3-ubyte" in n]
    if not image_files:
        raise SourceError(f"source {uri!r} holds no '*-images-idx3-ubyte[.gz]' file")
    images, labels, keys = [], [], []
    for name in image_files:
        split = PurePosixPath(name).name.split("-images")[0]
        imgs = read_idx(proto + name)
        stem = name.replace("images-idx3", "labels-idx1").removesuffix(".gz")
        lab_name = next((n for n in (stem, stem + ".gz") if fs.exists(n)), None)
        labs = read_idx(proto + lab_name) if lab_name else None
        images.append(imgs)
        labels.append(labs)
        keys.append(split)
    if len({i.shape[1:] for i in images}) > 1:
        raise SourceError(f"{uri}: IDX files hold images of different sizes {[i.shape[1:] for i in images]}")
    has_labels = all(lab is not None for lab in labels)
    prefix = sanitize_key(PurePosixPath(path.rstrip("/")).name.split("-images")[0]) or "idx"
    return ArraySource(
        uri, prefix, np.concatenate(images), np.concatenate(labels) if has_labels else None,
        splits=[(k, len(i)) for k, i in zip(keys, images)],
    )


def npz_source(uri: str) -> ArraySource:
    with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
        x_name = next((n for n in ("images", "x", "X", "x_train") if n in z.files), None)
        if x_name is None:
            raise SourceError(f"{uri}: no image array; expected one named images, x or X (found {z.files})")
        x = z[x_name]
        y_name = next((n for n in ("labels", "y", "Y", "y_train") if n in z.files), None)
        y = z[y_name] if y_name else None
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4):
        raise SourceError(f"{uri}: images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype != np.uint8:
        hi = float(x.max()) if x.size else 1.0
        x = np.clip(x * (255.0 / hi if hi > 1.0 else 255.0), 0, 255).astype(np.uint8)
    stem = sanitize_key(PurePosixPath(uri.split("://")[-1]).stem)
    return ArraySource(uri, stem, x, y)


def digits_source() -> ArraySource:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are 0..16; scale to the full uint8 range so they look like any other grayscale image.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource("sklearn:digits", "digits", images, d.target.astype(np.int64))


def open_source(spec: str, list_files: bool = True):
    """The source a user names: sklearn:digits, a .npz, MNIST IDX files, or an image folder (listed here; with
    list_files=False its URI, checked to exist, for a caller that lists it in parallel)."""
    if spec == "sklearn:digits":
        return digits_source()
    fs, path = storage.filesystem(spec)
    try:
        found = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - botocore's and the OS's errors differ; the user needs the cause
        raise SourceError(f"cannot read source {spec!r}: {type(e).__name__}: {e}. {storage.CREDENTIALS_HINT}") from None
    if not found:
        raise SourceError(
            f"source {spec!r} does not exist: give an image folder, MNIST IDX files, a .npz or sklearn:digits"
        )
    if path.endswith(".npz"):
        return npz_source(spec)
    if "idx3-ubyte" in path or (fs.isdir(path) and any("images-idx3-ubyte" in n for n in storage.first_names(spec))):
        return idx_source(spec)
    if not fs.isdir(path):
        raise SourceError(f"source {spec!r} is a file of an unknown kind: give a folder of images, IDX files or a .npz")
    return FolderSource(spec) if list_files else spec
