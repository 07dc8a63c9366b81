"""Existing WebDataset corpora, read where they lie (docs/DESIGN.md §3): tars written by webdataset's `TarWriter`,
img2dataset or `tar` itself, named by a folder or prefix of `*.tar`, one tar, or a brace pattern
(`s3://bucket/laion/{00000..09999}.tar`).

The shard job indexes such a corpus rather than copying it: a task per group of tars walks each tar's headers
(seeking past the members' bytes) and records its sample count, bytes, image member kinds, the key range and a
fingerprint that a changed tar cannot keep (its size with its ETag on S3, its mtime on a filesystem). Readers check
the fingerprint before they read, so a tar rewritten after indexing is refused rather than read as the corpus.

Rules (a user's corpus is taken as it is; nothing is renamed):
- a sample is a run of consecutive members sharing a key (webdataset's rule, `shards.MEMBER_NAME`); its key is
  that `__key__`, its source the `url` of its json member where there is one, else `TAR#KEY`;
- a sample without an image member (IMAGE_EXTS) is a counted skip, and so is a tar cut short or with a damaged
  header (all of it);
- the same key twice in one tar, or in two tars, is refused with both places named.
"""
from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from pathlib import PurePosixPath

from PIL import Image

from . import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members that can be a sample's image, in the order they are taken
SHAPE_PROBES = 4  # images per tar whose header is read for the manifest's sampled summary of shapes
PROBE_BYTES = 256 * 1024  # enough of an image member for PIL to read its size and mode
BRACE = re.compile(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}]*,[^{}]*\}")


class CorpusError(ValueError):
    """A WebDataset corpus that cannot be used as it is; the message names the tars and says what to do."""


class BrokenTar(CorpusError):
    """A tar cut short (a download or copy that stopped) or with a damaged header: its samples are a counted skip."""


def is_pattern(spec: str) -> bool:
    return spec.endswith(".tar") and BRACE.search(spec) is not None


def expand(spec: str) -> list[str]:
    """A brace pattern's tar URIs, in order (webdataset's own expansion: {00000..00099} keeps the zero padding)."""
    from braceexpand import braceexpand

    return list(braceexpand(spec))


def is_webdataset(spec: str) -> bool:
    """Whether a source names WebDataset tars: a brace pattern or one `.tar`, or a folder/prefix whose own entries
    include `*.tar` files and no image file (a folder of loose images with an archive beside them stays a folder).
    Only the first entries of the top level are looked at (where img2dataset and the public corpora put their
    tars), so the glance costs the same for a prefix of a billion images."""
    if spec.endswith(".tar"):
        return True
    if spec.startswith("sklearn:"):
        return False
    fs, path = storage.filesystem(spec)
    try:
        if not fs.isdir(path):
            return False
        names = storage.first_names(spec)
    except Exception:  # noqa: BLE001 - a source that cannot be read: open_source names the cause (credentials, ...)
        return False
    from .sources import IMAGE_EXTS as LOOSE_EXTS

    tars = any(n.endswith(".tar") and not n.startswith(".") for n in names)
    return tars and not any(PurePosixPath(n).suffix.lower() in LOOSE_EXTS for n in names)


def tar_uris(spec: str) -> list[str]:
    """The tars a source names, sorted as given: a pattern's expansion, one tar, or a folder's `*.tar` (top level,
    hidden names left out)."""
    if is_pattern(spec):
        return expand(spec)
    if spec.endswith(".tar"):
        return [spec]
    fs, path = storage.filesystem(spec)
    names = sorted(PurePosixPath(n).name for n in fs.ls(path, detail=False))
    return [storage.join(spec, n) for n in names if n.endswith(".tar") and not n.startswith(".")]


def tar_names(uris: list[str]) -> list[str]:
    """Short names that tell the tars apart (the manifest's `name`): the path below their longest common folder."""
    parts = [u.split("://", 1)[-1].split("/") for u in uris]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def fingerprint(uri: str) -> dict:
    """What a tar's bytes cannot change without changing: its size, with its ETag (S3) or mtime (a filesystem)."""
    fs, path = storage.filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise CorpusError(f"{uri} does not exist: the corpus changed after it was indexed. Re-run dicl shard.") from None
    fp = {"size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        fp["etag"] = str(etag).strip('"')
    else:
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        fp["mtime"] = float(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)
    return fp


def check_fingerprint(uri: str, recorded: dict) -> None:
    """Refuse a tar that is not the one indexed (rewritten, replaced or cut since)."""
    now = fingerprint(uri)
    if now != recorded:
        raise CorpusError(f"{uri} changed after the corpus was indexed (recorded {recorded}, now {now}): "
                          "re-index it with dicl shard before training or labelling")


def walk(f, size: int, uri: str) -> list[dict]:
    """An open tar's samples from its headers alone: {__key__, ext: (offset, length), ...} by webdataset's rule
    (shards.group_samples over shards.tar_members, strict: a cut or damaged tar raises BrokenTar)."""
    from .shards import group_samples, tar_members

    def read_at(at: int, n: int) -> bytes:
        f.seek(at)
        return f.read(n)

    members = tar_members(read_at, size, strict=True)
    return group_samples([{"fname": name, "data": (at, length)} for name, at, length in members], uri)


def image_ext(exts) -> str | None:
    """The member that is a sample's image: `jpg`, `jpeg`, `png` or `webp` (in that order), or an extension that
    ends in one (`seg.png`), as webdataset's decoders match them; None when it has none."""
    for e in IMAGE_EXTS:
        if e in exts:
            return e
    return next((x for x in exts if not x.startswith("_") and x.rsplit(".", 1)[-1] in IMAGE_EXTS), None)


def tar_keys(uri: str) -> list[str]:
    """The keys of a tar's samples that have an image, from its headers (the cross-tar duplicate check)."""
    fs, path = storage.filesystem(uri)
    size = int(fs.info(path).get("size") or 0)
    with fs.open(path, "rb", block_size=2**20) as f:
        return [s["__key__"] for s in walk(f, size, uri) if image_ext(s)]


def index_tar(uri: str) -> dict:
    """One tar's entry of the manifest, from its headers (and the first bytes of a few images, for their shapes).
    A tar cut short is returned as skipped, with the reason."""
    from .shards import UnknownMember

    fp = fingerprint(uri)
    fs, path = storage.filesystem(uri)
    entry = {"uri": uri, "bytes": fp["size"], "fingerprint": fp}
    try:
        with fs.open(path, "rb", block_size=2**20) as f:
            keys, kinds, shapes, skipped, labelled = set(), Counter(), Counter(), [], 0
            for s in walk(f, fp["size"], uri):
                key, ext = s["__key__"], image_ext(s)
                if ext is None:
                    exts = sorted(e for e in s if not e.startswith("_"))
                    skipped.append(f"{uri}#{key}: no image member (has {', '.join(exts) or 'none'})")
                    continue
                if key in keys:
                    raise CorpusError(f"{uri}: the key {key!r} names two samples (its members are not consecutive, "
                                      "or repeat): give each sample one run of members")
                keys.add(key)
                kinds[ext] += 1
                labelled += "cls" in s
                if len(keys) <= SHAPE_PROBES:
                    offset, length = s[ext]
                    f.seek(offset)
                    shapes[probe_shape(f.read(min(length, PROBE_BYTES)))] += 1
    except BrokenTar as e:
        return {**entry, "samples": 0, "truncated": f"{uri}: {e}; none of its samples are read. "
                "Download or copy it again, then re-run dicl shard"}
    except ValueError as e:  # a key in two samples, a member twice in one sample (both name the tar)
        raise CorpusError(str(e)) from None
    except UnknownMember as e:
        raise CorpusError(f"{uri}: a member of kind {e} (a sparse file or a device) is not read: repack the tar with "
                          "webdataset or tar") from None
    entry.update(samples=len(keys), images=dict(kinds), labelled=labelled, skipped=len(skipped),
                 skipped_examples=skipped[:5],
                 first_key=min(keys) if keys else "", last_key=max(keys) if keys else "",
                 shapes={f"{h}x{w}x{m}": n for (h, w, m), n in shapes.items() if h})
    return entry


def probe_shape(head: bytes) -> tuple[int, int, str]:
    """(height, width, mode) from an image's first bytes, or (0, 0, '') where they do not tell."""
    try:
        with Image.open(io.BytesIO(head)) as im:
            return im.height, im.width, im.mode
    except Exception:  # noqa: BLE001 - a probe only; the image itself is decoded (or skipped) when read
        return 0, 0, ""


def overlapping(entries: list[dict]) -> list[list[int]]:
    """Groups of tars (positions) whose key ranges overlap: only within such a group can a key repeat, since keys
    are unique within a tar. Sorted corpora (img2dataset's, numbered keys per tar) have none, and are proven unique
    by their ranges alone, without any key leaving its task."""
    order = sorted((i for i, e in enumerate(entries) if e["samples"]), key=lambda i: entries[i]["first_key"])
    groups, current, reach = [], [], ""
    for i in order:
        if current and entries[i]["first_key"] <= reach:
            current.append(i)
            reach = max(reach, entries[i]["last_key"])
            continue
        if len(current) > 1:
            groups.append(current)
        current, reach = [i], entries[i]["last_key"]
    if len(current) > 1:
        groups.append(current)
    return groups


def duplicates(uris: list[str]) -> list[tuple[str, str, str]]:
    """(key, first tar, second tar) for keys found in two of these tars (at most 10)."""
    seen, found = {}, []
    for uri in uris:
        for key in tar_keys(uri):
            if key in seen and len(found) < 10:
                found.append((key, seen[key], uri))
            seen.setdefault(key, uri)
    return found


def content_hash(entries: list[dict]) -> str:
    return hashlib.sha256("".join(f"{e['name']}:{sorted(e['fingerprint'].items())}" for e in entries).encode()).hexdigest()
