"""An offline ``gs://`` for tests: one local directory served two ways, as the real GCS is.

* ``etils.epath`` (emajax's paths, orbax's directory operations) reaches ``gs://`` through fsspec: a
  filesystem registered for the ``gs``/``gcs`` protocols maps ``gs://BUCKET/KEY`` to ``ROOT/BUCKET/KEY``.
* TensorStore (orbax's array data) speaks the GCS JSON API over HTTP: a small server implementing the
  calls it makes (media get/upload with generation preconditions, metadata, list, delete) serves the
  same directory, found through ``TENSORSTORE_GCS_HTTP_URL``.
* orbax asks ``google.cloud.storage`` whether a bucket has a hierarchical namespace: a stub module
  answers no (a flat bucket, the common case); stub ``google``/``google.cloud`` packages stand in where
  none is installed (google-cloud-storage is not a dependency).

So a run directory ``gs://bucket/run`` takes the same code path as on Google Cloud (remote paths,
no local rename), with the bytes landing under ROOT for the test to read.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib
import json
import os
import sys
import threading
import types
import urllib.parse
from pathlib import Path
from typing import Iterator

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


def _bucket_fs(root: Path) -> type:
    class BucketFS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):  # epath passes gcsfs options (finalize_on_close=...)
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        @classmethod
        def _strip_protocol(cls, path):
            path = path if isinstance(path, str) else os.fspath(path)
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    path = path[len(p):]
            return path.rstrip("/")

        def _join(self, path):
            if isinstance(path, str):
                return super()._join(self._strip_protocol(path))
            return super()._join([self._strip_protocol(p) for p in path])

    return BucketFS


def _handler(root: Path) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, obj: dict) -> None:
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _parse(self) -> tuple[list[str], dict[str, str]]:
            u = urllib.parse.urlsplit(self.path)
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}
            return [urllib.parse.unquote(s) for s in u.path.split("/") if s], q

        @staticmethod
        def _generation(p: Path) -> int:
            return p.stat().st_mtime_ns if p.is_file() else 0

        def _meta(self, bucket: str, name: str, p: Path) -> dict:
            st = p.stat()
            g = str(st.st_mtime_ns)
            return {"kind": "storage#object", "bucket": bucket, "name": name, "generation": g,
                    "metageneration": "1", "size": str(st.st_size), "updated": "2026-01-01T00:00:00Z",
                    "timeCreated": "2026-01-01T00:00:00Z"}

        def _precondition(self, q: dict[str, str], p: Path) -> bool:
            g = self._generation(p)
            if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != g:
                return False
            if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == g:
                return False
            return True

        def do_GET(self) -> None:
            parts, q = self._parse()
            if parts[:3] != ["storage", "v1", "b"] or len(parts) < 5:
                return self._send(400)
            bucket = parts[3]
            if len(parts) == 5 and parts[4] == "o":  # list
                prefix = q.get("prefix", "")
                base = root / bucket
                items = []
                if base.is_dir():
                    for p in sorted(base.rglob("*")):
                        if p.is_file():
                            name = p.relative_to(base).as_posix()
                            if name.startswith(prefix) and name >= q.get("startOffset", "") and (
                                    not q.get("endOffset") or name < q["endOffset"]):
                                items.append(self._meta(bucket, name, p))
                return self._json(200, {"kind": "storage#objects", "items": items})
            name = "/".join(parts[5:])
            p = root / bucket / name
            if not p.is_file():
                return self._json(404, {"error": {"code": 404, "message": "No such object"}})
            if not self._precondition(q, p):
                return self._send(304 if "ifGenerationNotMatch" in q else 412)
            if q.get("alt") != "media":
                return self._json(200, self._meta(bucket, name, p))
            data = p.read_bytes()
            headers = {"x-goog-generation": p.stat().st_mtime_ns, "x-goog-metageneration": 1,
                       "Content-Type": "application/octet-stream"}
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                a = int(a) if a else 0
                b = int(b) if b else len(data) - 1
                headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
                return self._send(206, data[a:b + 1], headers)
            return self._send(200, data, headers)

        def do_POST(self) -> None:
            parts, q = self._parse()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if parts[:4] != ["upload", "storage", "v1", "b"] or q.get("uploadType") != "media":
                return self._send(400)
            bucket, name = parts[4], q["name"]
            p = root / bucket / name
            if not self._precondition(q, p):
                return self._send(412)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(body)
            return self._json(200, self._meta(bucket, name, p))

        def do_DELETE(self) -> None:
            parts, q = self._parse()
            p = root / parts[3] / "/".join(parts[5:])
            if not p.is_file():
                return self._send(404)
            if not self._precondition(q, p):
                return self._send(412)
            p.unlink()
            return self._send(204)

    return Handler


@contextlib.contextmanager
def fake_gcs(root: Path) -> Iterator[Path]:
    """``gs://`` served from ``root`` for this process (epath/fsspec and TensorStore); restores on exit."""
    import fsspec
    from etils.epath import backend

    root.mkdir(parents=True, exist_ok=True)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(root))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    old_env = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{srv.server_address[1]}"
    fs_cls = _bucket_fs(root)
    registry = sys.modules["fsspec.registry"]._registry
    for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, fs_cls, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    storage = types.ModuleType("google.cloud.storage")
    storage.Client = lambda *a, **k: types.SimpleNamespace(
        get_bucket=lambda name: types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False))
    stubs = {"google.cloud.storage": storage}
    for name in ("google", "google.cloud"):  # absent where nothing installed a google.cloud package
        try:
            importlib.import_module(name)
        except ImportError:
            stubs[name] = types.ModuleType(name)
            stubs[name].__path__ = []
    old_modules = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        from orbax.checkpoint._src.path import gcs_utils

        gcs_utils.get_bucket.cache_clear()
    except (ImportError, AttributeError):
        pass
    try:
        yield root
    finally:
        srv.shutdown()
        backend.fsspec_backend._get_filesystem.cache_clear()
        for proto in ("gs", "gcs"):
            registry.pop(proto, None)  # back to fsspec's own (gcsfs) entry
        for name, old in old_modules.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        if old_env is None:
            os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
        else:
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = old_env
