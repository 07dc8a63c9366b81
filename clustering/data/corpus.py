"""Existing WebDataset corpora, read where they lie (DESIGN.md §3): tars written by webdataset's `TarWriter`,
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


def tar_members(f, size: int):
    """(name, offset, length) of each regular member of an open tar, reading the headers only: the members' bytes
    are skipped by seeking. PAX and GNU long names are followed. A member that runs past the end, or an end before
    the end-of-archive blocks, or a header whose checksum fails, raises BrokenTar."""
    pos, long_name = 0, None
    while True:
        if pos + 512 > size:  # every writer ends a tar with zero blocks: a tar that stops before them was cut
            raise BrokenTar(f"cut short: it ends at byte {size:,} without the end-of-archive blocks")
        f.seek(pos)
        header = f.read(512)
        if header[:1] == b"\0":
            return  # end-of-archive blocks
        kind = header[156:157]
        try:
            length = int(header[124:136].rstrip(b" \0") or b"0", 8)
            recorded = int(header[148:156].rstrip(b" \0") or b"0", 8)
        except ValueError:
            recorded, length = -1, 0
        if recorded != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the checksum counts its own field as spaces
            raise BrokenTar(f"damaged: the header at byte {pos:,} fails its checksum (not a tar, or a corrupted one)")
        body_at = pos + 512
        pos = body_at + (length + 511) // 512 * 512
        if body_at + length > size:
            raise BrokenTar(f"cut short: the member at byte {body_at - 512:,} needs {length:,} bytes, and the file "
                            f"ends at {size:,}")
        if kind in (b"x", b"L"):
            f.seek(body_at)
            body = f.read(length)
            if kind == b"L":
                long_name = body.rstrip(b"\0").decode()
            else:
                for record in body.decode("utf-8").splitlines():
                    key, _, value = record.partition(" ")[2].partition("=")
                    if key == "path":
                        long_name = value
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue  # folders, links, global headers: not members of a sample
        name = header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
        yield long_name or (f"{prefix}/{name}" if prefix else name), body_at, length
        long_name = None


def grouped(members) -> list[dict]:
    """Members in tar order -> samples {key, exts: {ext: (offset, length)}}, by webdataset's key rule."""
    from .shards import MEMBER_NAME

    samples: list[dict] = []
    for name, offset, length in members:
        match = MEMBER_NAME.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if not samples or samples[-1]["key"] != key:
            samples.append({"key": key, "exts": {}})
        if ext in samples[-1]["exts"]:  # webdataset's reader (and ours) refuses it too
            raise CorpusError(f"{name} appears twice in one sample")
        samples[-1]["exts"][ext] = (offset, length)
    return samples


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
        return [s["key"] for s in grouped(tar_members(f, size)) if image_ext(s["exts"])]


def index_tar(uri: str) -> dict:
    """One tar's entry of the manifest, from its headers (and the first bytes of a few images, for their shapes).
    A tar cut short is returned as skipped, with the reason."""
    fp = fingerprint(uri)
    fs, path = storage.filesystem(uri)
    entry = {"uri": uri, "bytes": fp["size"], "fingerprint": fp}
    try:
        with fs.open(path, "rb", block_size=2**20) as f:
            samples = grouped(tar_members(f, fp["size"]))
            keys, kinds, shapes, skipped, labelled = set(), Counter(), Counter(), [], 0
            for s in samples:
                ext = image_ext(s["exts"])
                if ext is None:
                    skipped.append(f"{uri}#{s['key']}: no image member (has {', '.join(sorted(s['exts'])) or 'none'})")
                    continue
                if s["key"] in keys:
                    raise CorpusError(f"the key {s['key']!r} names two samples (its members are not "
                                      "consecutive, or repeat): give each sample one run of members")
                keys.add(s["key"])
                kinds[ext] += 1
                labelled += "cls" in s["exts"]
                if len(keys) <= SHAPE_PROBES:
                    offset, length = s["exts"][ext]
                    f.seek(offset)
                    shapes[probe_shape(f.read(min(length, PROBE_BYTES)))] += 1
    except BrokenTar as e:
        return {**entry, "samples": 0, "truncated": f"{uri}: {e}; none of its samples are read. "
                "Download or copy it again, then re-run dicl shard"}
    except CorpusError as e:
        raise CorpusError(f"{uri}: {e}") from None
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
