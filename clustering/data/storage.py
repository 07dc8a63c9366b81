"""One way to reach storage: local paths, file:// and s3:// URIs through fsspec.

S3 settings come from the environment and the AWS credential chain, never from config files:
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (a non-AWS endpoint such as MinIO or a test server),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, AWS_REGION.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


CREDENTIALS_HINT = ("For s3://, check the bucket name, the credentials in the environment "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), and AWS_ENDPOINT_URL for non-AWS endpoints.")


TMP_MARK = ".tmp-"  # in the name of write_bytes' temporary file beside its target


class StorageError(OSError):
    """A storage location that cannot be used; the message names it and says what to check."""


class Missing(StorageError):
    """An object that does not exist."""


def s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def check_uri(uri: str) -> str:
    """A URI with a bucket, and no local path that is a mistyped URI (`s3:/x`, `s3:` would make a folder `s3:`)."""
    if is_remote(uri) and not uri.split("://", 1)[1].strip("/"):
        raise StorageError(f"{uri!r} names no bucket: write s3://BUCKET or s3://BUCKET/prefix")
    if re.match(r"^(s3a?|gs|gcs|az|abfs|hdfs):(/?[^/]|/?$)", uri):
        raise StorageError(f"{uri!r} looks like a URI with too few slashes: write s3://BUCKET/prefix")
    return uri


_S3: dict[tuple, fsspec.AbstractFileSystem] = {}


def s3_filesystem() -> fsspec.AbstractFileSystem:
    """One S3 filesystem per process and AWS_* environment: making its client costs about 0.1 s of CPU, more than
    a request, and every storage call would pay it. A changed endpoint or credential in the environment gets a new
    one; listings are never cached, since other processes write the same prefixes."""
    key = (os.getpid(), *sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    if key not in _S3:
        _S3[key] = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **s3_options())
    return _S3[key]


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI."""
    check_uri(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        uri = "s3://" + uri.split("://", 1)[1]
        fs = s3_filesystem()
        return fs, fs._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    check_uri(base)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """Local paths made absolute, so Ray workers (whose working folder differs) find them; `~` expanded, as fsspec
    expands it where a path is read or written, so every stage resolves a path alike; URIs unchanged."""
    if not uri or is_remote(uri) or uri.startswith("sklearn:"):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def named_error(uri: str, e: Exception, doing: str = "read") -> Exception:
    """The error `e` of reading or writing `uri`, naming it: a StorageError for an error of access (missing
    credentials, access denied: the user's to fix), the same OSError with the URI for one of the device or network
    (EIO, EREMOTEIO), else `e` as it is."""
    if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError") or \
            isinstance(e, PermissionError):
        return StorageError(f"cannot {doing} {uri}: {type(e).__name__}: {e}. {CREDENTIALS_HINT}")
    if isinstance(e, OSError) and e.errno is not None and uri not in str(e):  # EIO, EREMOTEIO: name the object
        return type(e)(e.errno, f"{e.strerror or e}: {uri}")
    return e


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except Exception as e:
        raise named_error(uri, e) from None


def modified(uri: str) -> float:
    """When an object was last written (seconds since the epoch): a local file's mtime, an S3 object's LastModified."""
    fs, path = filesystem(uri)
    info = fs.info(path)
    when = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise Missing(f"{uri} does not exist") from None
    except Exception as e:
        raise named_error(uri, e) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic per object: readers see the old object or the whole new one, never a part.

    On S3 one PUT is atomic by itself. On a filesystem we write a temporary file beside
    the target and rename it over, which is atomic on POSIX.
    """
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, LocalFileSystem):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException as e:  # a full disk, an interrupt: leave no part-written file behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise named_error(uri, e, "write") if isinstance(e, Exception) else e from None
    else:
        try:
            fs.pipe_file(path, data)
        except Exception as e:
            raise named_error(uri, e, "write") from None


def sweep_temporary(folder: str) -> int:
    """Remove the temporary files that a killed writer left in a local folder (`write_bytes`'s); returns how many.
    Only for a folder this process holds the lease of: no other writer's file is in flight there."""
    fs, path = filesystem(folder)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return 0
    stale = [e.path for e in os.scandir(path) if TMP_MARK in e.name and e.is_file(follow_symlinks=False)]
    for p in stale:
        with contextlib.suppress(OSError):
            os.remove(p)
    return len(stale)


def create(uri: str, data: bytes) -> bool:
    """Write `data` only if `uri` does not exist yet; False if it does. Atomic against a concurrent create: O_EXCL
    on a filesystem, a conditional PUT (If-None-Match) on S3 (an S3-compatible store that ignores the condition
    makes this a plain write)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        fs.pipe_file(path, data, IfNoneMatch="*")
    except FileExistsError:  # s3fs's translation of 412 Precondition Failed
        return False
    return True


def _children(uri: str, kind: str) -> list[str]:
    fs, path = filesystem(uri)
    try:  # one request, not an exists() and then a listing: a prefix can empty between the two (a marker deleted)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = [e["name"] for e in entries if e["type"] == kind]
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return sorted(prefix + n.split("://", 1)[-1] for n in names)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm_file(path)


def first_names(uri: str, n: int = 1000) -> list[str]:
    """The names of up to n entries directly under a folder/prefix (files and folders, in storage's order): one
    request on S3, a partial scan on disk, so a glance at what a source holds costs the same at any size."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with os.scandir(path) as entries:
            return [e.name for _, e in zip(range(n), entries)]
    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=n)
    names = [c["Prefix"][len(prefix):].rstrip("/") for c in page.get("CommonPrefixes", [])]
    return names + [o["Key"][len(prefix):] for o in page.get("Contents", [])]


def remove_tree(uri: str) -> None:
    """A folder/prefix and everything under it (nothing when it is absent)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files directly under a folder/prefix that end with `suffix`."""
    return [f for f in _children(uri, "file") if f.endswith(suffix)]


def list_dirs(uri: str) -> list[str]:
    """Sorted URIs of the folders directly under a folder/prefix."""
    return _children(uri, "directory")


def check_writable(uri: str) -> None:
    """Fail early, naming the location, when a bucket is wrong or credentials are missing."""
    probe = join(uri, f"_write_probe_{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        fs, path = filesystem(probe)
        fs.rm_file(path)
    except StorageError as e:  # named already, with the hint
        raise StorageError(str(e).replace(probe, uri)) from None
    except Exception as e:  # botocore and OS errors differ; the user needs the location and the cause
        raise StorageError(
            f"cannot write to {uri}: {type(e).__name__}: {e}. Check the path. {CREDENTIALS_HINT}") from None
