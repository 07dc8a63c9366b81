"""WebDataset shards: write them from decoded sources, read them back (whole, or split by rank).

Layout (docs/DESIGN.md §3): `shard-000000.tar` ... with members grouped and sorted by key
(`KEY.png|jpg`, optional `KEY.cls`, `KEY.json`) and a `manifest.json` beside them.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
from PIL import Image

from . import corpus, storage
from .sources import GRAY_MODES, BadImage, to_8bit

MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def is_shard_name(name: str) -> bool:
    return re.fullmatch(r"shard-\d{6,}\.tar", name) is not None


def shard_index(uri: str) -> int:
    return int(uri.rsplit("shard-", 1)[1].split(".")[0])


def name_of(uri: str) -> str:
    """A shard's file name (the manifest's `name`) from its URI."""
    return uri.rsplit("/", 1)[-1]


class StaleShard(storage.StorageError):
    """A shard whose bytes differ from what its manifest recorded: an interrupted or concurrent shard job."""


def write_shard(samples: list[dict], uri: str) -> dict:
    """Write samples (dicts with __key__, png|jpg, optional cls, json) as one tar; returns its stats.
    Byte-reproducible: members sorted by key, fixed mtime, owner and mode, so the same images give the same shard
    (and the same content_hash, which lets a re-run resume labelling). The bytes are those of webdataset's
    `TarWriter(mtime=0)` (a test holds them equal); written with tarfile so that the shard and decode tasks never
    import webdataset, which imports torch (~1.5 s and ~200 MB per worker process)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for s in sorted(samples, key=lambda s: s["__key__"]):  # sorted keys: readers group by key
            for ext in sorted(k for k in s if not k.startswith("_")):
                data = encode_member(ext, s[ext])
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return {"name": name_of(uri), "samples": len(samples), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def encode_member(ext: str, value) -> bytes:
    """A member's bytes as webdataset encodes them: bytes as they are, text as UTF-8, `json` dumped, `cls` as digits."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json":
        return json.dumps(value).encode("utf-8")
    if ext == "cls":
        return str(value).encode("ascii")
    raise ValueError(f"no encoding for a {type(value).__name__} under .{ext}")


def read_shard(uri: str, check: str | dict | None = None) -> list[dict]:
    """The samples of one shard that have an image, as dicts: __key__, image bytes under their extension ('png',
    'jpg', ...), 'cls', 'json'. With `check` (the manifest's), a shard that changed is refused rather than read as
    the corpus: a sha256 for the shard job's own shards, a fingerprint for a WebDataset corpus indexed in place
    (whose samples without an image the index counted as skipped, and which are left out here alike)."""
    if isinstance(check, dict):
        corpus.check_fingerprint(uri, check)
    data = storage.read_bytes(uri)
    if isinstance(check, str) and hashlib.sha256(data).hexdigest() != check:
        raise StaleShard(f"{uri} is not the shard {MANIFEST} describes (its sha256 differs): the shards changed after "
                         "the manifest was written, by an interrupted or concurrent shard job. Re-run dicl shard.")
    if isinstance(check, dict) and len(data) != check["size"]:
        raise corpus.CorpusError(f"{uri} changed while it was read ({len(data):,} bytes where the index recorded "
                                 f"{check['size']:,}): re-index it with dicl shard")
    try:  # strict where no sha256 vouches for the bytes: a cut or damaged tar is named, not misread
        files = plain_tar_members(data, strict=not isinstance(check, str))
        if files is None:  # member kinds the fast reader does not know: Python's tarfile reads every kind
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                files = [{"fname": m.name, "data": tar.extractfile(m).read()} for m in tar if m.isfile()]
    except (corpus.BrokenTar, tarfile.TarError) as e:
        raise corpus.BrokenTar(f"{uri} is not a whole tar ({e}): download or copy it again") from None
    return [s for s in group_samples(files, uri) if corpus.image_ext(s)]


# webdataset's key rule: a member's key is its path up to the first dot of its file name, the rest its extension.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def group_samples(files: list[dict], uri: str) -> list[dict]:
    """Tar members ({fname, data}, in tar order) -> samples, as webdataset groups them: consecutive members that
    share a key form one sample, under their lower-cased extensions; a repeated extension is an error."""
    samples: list[dict] = []
    for f in files:
        match = MEMBER_NAME.match(f["fname"])
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key, "__url__": uri})
        if ext in samples[-1]:
            raise ValueError(f"{uri}: {f['fname']} appears twice in one sample")
        samples[-1][ext] = f["data"]
    return samples


class UnknownMember(Exception):
    """A member kind the header walk does not read (sparse files, devices): the caller reads the tar with tarfile."""


def tar_members(read_at, size: int, strict: bool = False):
    """(name, offset, length) of each regular member of a tar, from its headers alone: `read_at(pos, n)` gives n
    bytes at pos (a slice of bytes in memory, a seek and read of a file), so members' bytes are never read here.
    About 10x faster than tarfile on 30,000 tiny members. Follows PAX extended headers and GNU long names; leaves
    out folders, links and global headers (tarfile's isfile does too); raises UnknownMember at any other kind.
    strict (a tar indexed in place, which no sha256 vouches for): a header whose checksum fails, a member past the
    end, or an end before the end-of-archive blocks raise corpus.BrokenTar."""
    pos, long_name = 0, None
    while True:
        if pos + 512 > size:
            if strict:  # every writer ends a tar with zero blocks: a tar that stops before them was cut
                raise corpus.BrokenTar(f"cut short: it ends at byte {size:,} without the end-of-archive blocks")
            return
        header = read_at(pos, 512)
        if header[:1] == b"\0":
            return  # end-of-archive blocks
        kind = header[156:157]
        try:
            length = int(header[124:136].rstrip(b" \0") or b"0", 8)
            recorded = int(header[148:156].rstrip(b" \0") or b"0", 8) if strict else 0
        except ValueError:
            length, recorded = 0, -1
        if strict and recorded != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # its own field counts as spaces
            raise corpus.BrokenTar(f"damaged: the header at byte {pos:,} fails its checksum (not a tar, or a "
                                   "corrupted one)")
        body_at = pos + 512
        pos = body_at + (length + 511) // 512 * 512
        if strict and body_at + length > size:
            raise corpus.BrokenTar(f"cut short: the member at byte {body_at - 512:,} needs {length:,} bytes, and the "
                                   f"file ends at {size:,}")
        if kind in (b"x", b"L"):  # PAX records "LEN key=value\n" (only a path matters here); a GNU long name
            body = read_at(body_at, length)
            if kind == b"L":
                long_name = body.rstrip(b"\0").decode()
            else:
                for record in body.decode("utf-8").splitlines():
                    key, _, value = record.partition(" ")[2].partition("=")
                    if key == "path":
                        long_name = value
            continue
        if kind in (b"1", b"2", b"5", b"g"):
            long_name = None
            continue
        if kind not in (b"0", b"\0", b"7"):
            raise UnknownMember(kind)
        name = header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
        yield long_name or (f"{prefix}/{name}" if prefix else name), body_at, length
        long_name = None


def plain_tar_members(data: bytes, strict: bool = False) -> list[dict] | None:
    """An in-memory tar's members as {fname, data} (tar_members); None at a member kind it does not read."""
    try:
        members = tar_members(lambda at, n: data[at:at + n], len(data), strict)
        return [{"fname": name, "data": data[at:at + length]} for name, at, length in members]
    except UnknownMember:
        return None


def write_manifest(base: str, manifest: dict) -> None:
    storage.write_bytes(storage.join(base, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(base: str) -> dict:
    uri = storage.join(base, MANIFEST)
    try:
        data = storage.read_bytes(uri)
    except storage.Missing:
        raise storage.StorageError(
            f"no shards at {base}: {MANIFEST} is missing. Run the shard job first (dicl shard ...)"
        ) from None
    try:
        return json.loads(data)
    except ValueError as e:
        raise storage.StorageError(f"{uri} is not a whole manifest ({e}): it was cut short or edited. Re-run "
                                   "dicl shard") from None


def unlisted_shards(base: str, manifest: dict) -> list[str]:
    """The shard job's tars (shard-NNNNNN.tar) beside a manifest that it does not list: an earlier job's, which the
    shard job removes when it writes its manifest, or an edited manifest's (their images would go unlabelled). An
    indexed corpus lists its tars by URI (they may lie beside it), the shard job's own by name."""
    indexed = manifest.get("layout") == "webdataset"
    listed = {s["uri"] if indexed else s["name"] for s in manifest["shards"]}
    return [u for u in storage.list_files(base, ".tar")
            if is_shard_name(name_of(u)) and (u if indexed else name_of(u)) not in listed]


def shard_uri(base: str, entry: dict) -> str:
    """Where a manifest entry's tar lies: beside the manifest, or (a corpus indexed in place) where it was found."""
    return entry.get("uri") or storage.join(base, entry["name"])


def shard_uris(base: str, manifest: dict) -> list[str]:
    return [shard_uri(base, s) for s in manifest["shards"]]


def check_of(entry: dict) -> str | dict:
    """What a reader checks a shard against: the sha256 the shard job recorded, or an indexed tar's fingerprint."""
    return entry.get("sha256") or entry["fingerprint"]


def entries_by_uri(manifest: dict):
    """uri -> the manifest's entry of that shard: an indexed tar's by its URI, the shard job's by its file name."""
    table = {s.get("uri") or s["name"]: s for s in manifest["shards"]}
    return lambda uri: table[uri] if uri in table else table[name_of(uri)]


def part_index(entry: dict) -> int:
    """The number of a shard's Parquet part: the shard's own (shard-000012.tar: 12), or an indexed tar's position."""
    return entry["index"] if "index" in entry else shard_index(entry["name"])


def rank_shards(shards: list, rank: int, world: int) -> list:
    """Shards (URIs or manifest entries) of one rank: round-robin, so ranks differ by at most one shard."""
    return shards[rank::world]


# The input policy (docs/DESIGN.md §3), the same in training, labelling and the report: every image is converted to the
# corpus' mode (L or RGB), its shorter side resized to `side` and its centre cropped to a square side x side.
# Nothing is stretched, and photos of any size and aspect ratio train together.
POLICY = "convert to the corpus' mode (L or RGB); resize the shorter side to image_size; centre-crop a square"
SIDE_CAP = 64  # the default side: the corpus' median shorter side, at most this, so training from scratch stays fast


def decode_image(data: bytes, mode: str, side: int) -> np.ndarray:
    """Encoded bytes -> uint8 (side, side, C) by the input policy."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft(mode, (side, side))  # decode at 1/2..1/8 scale while that still covers side: far faster for photos
        return apply_policy(im, mode, side)


def apply_policy(im: Image.Image, mode: str, side: int) -> np.ndarray:
    """A PIL image of any mode and size -> uint8 (side, side, C) by the input policy."""
    im = to_8bit(im)
    if im.mode != mode:
        im = im.convert(mode)
    w, h = im.size
    if (w, h) != (side, side):
        s = min(w, h)  # the centred square of the shorter side, resized in one step (antialiased)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        im = im.resize((side, side), Image.BILINEAR, box=box, reducing_gap=3.0)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


@dataclass
class Decoded:
    images: np.ndarray  # (N, H, W, C) uint8
    keys: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unknown
    shards: list[str]  # shard name per sample
    skipped: list[str] = field(default_factory=list)  # samples whose image did not decode: "TAR#KEY: why"
    sources: list[str] = field(default_factory=list)  # source_of each sample


def image_of(sample: dict) -> bytes:
    ext = corpus.image_ext(sample)
    if ext is None:
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image member")
    return sample[ext]


def source_of(sample: dict) -> str:
    """The input a sample came from: as the shard job recorded it in KEY.json (`source`), the `url` of a corpus'
    own json (img2dataset's), else TAR#KEY."""
    try:
        meta = json.loads(sample["json"]) if sample.get("json") else {}
        found = meta.get("source") or meta.get("url") if isinstance(meta, dict) else None
    except ValueError:
        found = None
    return str(found) if found else f"{sample.get('__url__', '')}#{sample['__key__']}"


def decode_samples(samples: list[dict], mode: str, side: int, shard: str) -> Decoded:
    """Samples -> images by the input policy. A sample whose image does not decode (a corpus indexed in place is
    read as it is: the shard job decoded its own shards' images once already) is left out and listed in `skipped`."""
    # One thread: for small images Python's per-image overhead dominates, and threads only contend for the GIL.
    arrays, kept, skipped = [], [], []
    for s in samples:
        try:
            arrays.append(decode_image(image_of(s), mode, side))
            kept.append(s)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            skipped.append(f"{s.get('__url__', shard)}#{s['__key__']}: not a readable image ({type(e).__name__}: {e})")
    c = 1 if mode == "L" else 3
    images = np.stack(arrays) if arrays else np.zeros((0, side, side, c), np.uint8)
    labels = np.array([int(s["cls"]) if "cls" in s else -1 for s in kept], dtype=np.int64)
    return Decoded(images, [s["__key__"] for s in kept], labels, [shard] * len(kept), skipped,
                   [source_of(s) for s in kept])


def corpus_side(manifest: dict) -> int:
    """The side images train at when train.image_size is not set: chosen by the shard job from the corpus."""
    img = manifest["image"]
    return int(img.get("side") or min(img["height"], img["width"]))  # manifests before the policy: the common shape


def image_spec(manifest: dict, side: int | None = None, channels: int | None = None) -> tuple[str, int]:
    """(PIL mode, side) every image is decoded to: the corpus' own (or `channels`), at `side` or the corpus' side."""
    c = channels or manifest["image"]["channels"]
    return ("L" if c == 1 else "RGB"), int(side or corpus_side(manifest))


def load_shard(uri: str, mode: str, side: int, members: np.ndarray | None = None, check: str | dict | None = None,
               name: str | None = None) -> Decoded:
    """One shard decoded (checked against `check`); `members`: only the samples at these positions (a sample
    drawn across the corpus); `name`: the shard's manifest name (its file name by default)."""
    samples = read_shard(uri, check)
    if members is not None:
        samples = [samples[i] for i in members]
    return decode_samples(samples, mode, side, name or name_of(uri))


def concat(parts: list[Decoded], mode: str, side: int) -> Decoded:
    if not parts:
        return Decoded(np.zeros((0, side, side, 1 if mode == "L" else 3), np.uint8), [], np.zeros(0, np.int64), [])
    return Decoded(np.concatenate([p.images for p in parts]), [k for p in parts for k in p.keys],
                   np.concatenate([p.labels for p in parts]), [s for p in parts for s in p.shards],
                   [s for p in parts for s in p.skipped], [s for p in parts for s in p.sources])


def load_shards(uris: list[str], manifest: dict, side: int | None = None, workers: int = 1,
                members: dict[str, np.ndarray] | None = None, channels: int | None = None) -> Decoded:
    """Read and decode whole shards (or the `members` of each, by shard name) into one uint8 array.
    With workers > 1, shards decode in parallel processes (forkserver: safe beside threads and CUDA)."""
    mode, side = image_spec(manifest, side, channels)
    entry = entries_by_uri(manifest)
    picks = [None if members is None else members.get(entry(u)["name"], np.zeros(0, np.int64)) for u in uris]
    jobs = [(u, p, check_of(entry(u)), entry(u)["name"]) for u, p in zip(uris, picks) if p is None or len(p)]
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            uris, picks, shas, names_ = zip(*jobs)
            parts = list(pool.map(load_shard, uris, repeat(mode), repeat(side), picks, shas, names_))
    else:
        parts = [load_shard(u, mode, side, p, h, n) for u, p, h, n in jobs]
    return concat(parts, mode, side)


def sample_members(manifest: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded, uniform random sample of n images across every shard: {shard name: sorted positions in it}.
    Memory O(n), whatever the corpus' size; every rank and every tune trial draws the same one."""
    counts = np.array([s["samples"] for s in manifest["shards"]], dtype=np.int64)
    total = int(counts.sum())
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard_of = np.searchsorted(starts, chosen, side="right") - 1
    return {s["name"]: chosen[shard_of == i] - starts[i] for i, s in enumerate(manifest["shards"])
            if (shard_of == i).any()}


def plan_shards(items: list, samples_per_shard: int, max_bytes: int) -> list[list]:
    """Consecutive groups of items, each within the sample count and (estimated) byte budget."""
    groups, current, size = [], [], 0
    for it in items:
        if current and (len(current) >= samples_per_shard or size + it.nbytes > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(it)
        size += it.nbytes
    if current:
        groups.append(current)
    return groups


def resized(d, side: int):
    """shard.store=resized: an image by the input policy at its shorter side or `side`, whichever is smaller (never
    enlarged), in its own mode, re-encoded: PNG stays lossless, a JPEG becomes a JPEG at quality 95."""
    from .sources import Decoded as SourceImage

    mode = "L" if d.mode in GRAY_MODES else "RGB"
    arr = decode_image(d.data, mode, min(side, d.width, d.height))
    im = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    buf = io.BytesIO()
    if d.ext == "png":
        im.save(buf, format="PNG", compress_level=1)
    else:
        im.save(buf, format="JPEG", quality=95)
    return SourceImage(buf.getvalue(), d.ext, im.width, im.height, mode)


def write_items(source, items: list, uri: str, store_side: int | None = None) -> dict:
    """Load, validate and write one shard of a source's items (with `store_side`: resized, shard.store=resized).
    An input that cannot be read or decoded, for any reason, is skipped and listed: one bad file (or one key
    storage cannot serve) never stops the job."""
    samples, skipped, shapes, original, stored = [], [], Counter(), 0, 0
    for it in items:
        try:
            d = source.load(it, verify=not store_side)  # resized: the draft-scale decode below is the check
            size = len(d.data)
            if store_side:
                original_size = {"original_width": d.width, "original_height": d.height}
                try:
                    d = resized(d, store_side)
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                    raise BadImage(f"{source.describe(it)}: not a readable image ({type(e).__name__}: {e})") from None
        except BadImage as e:
            skipped.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - a failed read is this input's fault, counted like a bad image
            skipped.append(f"{source.describe(it)}: could not be read ({type(e).__name__}: {e})")
            continue
        original += size
        stored += len(d.data)
        sample = {"__key__": it.key, d.ext: d.data,
                  "json": {"source": source.describe(it), "width": d.width, "height": d.height,
                           **(original_size if store_side else {})}}
        if it.label is not None:
            sample["cls"] = it.label
        samples.append(sample)
        shapes[(d.height, d.width, d.mode)] += 1
    stats = write_shard(samples, uri) if samples else None
    return {"shard": stats, "skipped": skipped, "shapes": shapes, "labelled": sum("cls" in s for s in samples),
            "original_bytes": original, "image_bytes": stored}


def shape_summary(shapes: Counter) -> dict:
    """What the manifest records of the images' shapes (bounded, however many distinct sizes a corpus has):
    the modes, the shorter side's quantiles and the most common shapes."""
    modes, shorter = Counter(), Counter()
    for (h, w, mode), n in shapes.items():
        modes[mode] += n
        shorter[min(h, w)] += n
    sides = np.repeat(np.array(list(shorter), dtype=np.int64), list(shorter.values()))
    q = {name: int(np.percentile(sides, p, method="nearest")) for name, p in
         [("min", 0), ("p10", 10), ("median", 50), ("p90", 90), ("max", 100)]}
    return {"distinct": len(shapes), "modes": dict(modes), "shorter_side": q,
            "most_common": [[f"{h}x{w}", mode, n] for (h, w, mode), n in shapes.most_common(20)]}


def choose_image(summary: dict) -> dict:
    """The corpus' training input: the majority's channels (gray or colour), and a square side of the median
    shorter side, capped at SIDE_CAP and rounded down to a multiple of 4, as the conv nets pool twice
    (train.image_size overrides it)."""
    gray = sum(n for m, n in summary["modes"].items() if m in GRAY_MODES)
    channels = 1 if 2 * gray >= sum(summary["modes"].values()) else 3
    side = max(4, min(summary["shorter_side"]["median"], SIDE_CAP) // 4 * 4)
    return {"side": side, "height": side, "width": side, "channels": channels, "policy": POLICY}
