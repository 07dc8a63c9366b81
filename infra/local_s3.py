"""An S3 endpoint on 127.0.0.1 (moto in server mode) for tests and offline demos.

    with local_s3("my-bucket") as endpoint:   # sets AWS_ENDPOINT_URL and test credentials in os.environ
        ...                                    # s3://my-bucket/... now works through clustering.data.storage

Run it by hand for a demo against s3:// URIs:  python -m infra.local_s3 --bucket demo
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from contextlib import contextmanager

ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_free(port: int) -> None:
    """Fail at once, naming the port, when something listens on it (moto's server would print "Address already in
    use" and wait forever)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise OSError(e.errno, f"port {port} on 127.0.0.1 is taken ({e.strerror}): give another with --port, or "
                                   "--port 0 for a free one") from None


@contextmanager
def local_s3(*buckets: str, port: int | None = None):
    """Start moto's S3 server on loopback, point the environment at it, create buckets; undo all on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = port or free_port()
    check_free(port)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ENV}
    # Dummy credentials for the local server only; real ones come from the environment / AWS chain.
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    p = argparse.ArgumentParser(description="Serve S3 on 127.0.0.1 until interrupted.")
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    p.add_argument("--port", type=int, default=5055, help="the port to serve on (0: a free one, printed)")
    args = p.parse_args()
    try:
        check_free(args.port or free_port())
    except OSError as e:
        raise SystemExit(f"error: {e.strerror}") from None
    with local_s3(*args.bucket, port=args.port) as endpoint:
        print(f"S3 at {endpoint} with buckets {args.bucket}. In another shell:\n"
              f"  export AWS_ENDPOINT_URL={endpoint} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n"
              "Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
