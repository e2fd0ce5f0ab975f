"""On-disk snapshots of model state: our own file format, written atomically, verified before use.

Owns the bytes on disk of the prompt cache's disk tier and of named sessions. A snapshot file holds a header,
the token ids the state represents, a JSON blob for the caller (a session's name and messages), the state's
"tail" (raw windows, compressor frontiers, the partial last page of every row store) and, for every full page of
compressed rows, a reference to a page file. Pages are content-addressed (`pages/ab/<sha256>`): compressed rows
are append-only, so the snapshots of one growing conversation share their pages on disk as they do in memory,
and a new snapshot only adds the pages it does not share ("the disk tier appends pages").

File layout (little endian), version 1:
    magic "DS4SNAP1" | u32 version | 64 B fingerprint (hex, ascii) | u64 n_tokens | u32 json_len | u64 tail_len |
    u32 n_page_refs | i32 tokens[n_tokens] | json | tail | 32 B page digests[n_page_refs] | 32 B sha256 of all before
The tail is a sequence of arrays, each `u8 dtype code | u8 ndim | u64 dims[ndim] | data`, in the order
`SessionState` lists them (see `_state_arrays`). A missing page, a wrong checksum, a foreign fingerprint or a
truncated file raises SnapshotError; callers log it and skip the file, never use it.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target: a crash leaves
either the old file or the new one, plus at most a temporary file that nothing reads and the next start deletes
(`remove_stale_temps`). Two threads write snapshots (the engine's worker spills prefix snapshots, its writer saves
sessions) and the worker also collects unreferenced pages: `PageStore.lock` keeps a snapshot's new pages, which
nothing references until its file is renamed into place, from being collected in between. Called by
`prefix_cache.py` and `session.py`; knows nothing about policy.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import signal
import struct
import threading
from pathlib import Path

import numpy as np

from .state import PAGE_ROWS, LayerState, RowStore, SessionState

MAGIC = b"DS4SNAP1"
VERSION = 1
_HEADER = struct.Struct("<8sI64sQIQI")
_DTYPES = {0: np.dtype(np.float16), 1: np.dtype(np.float32), 2: np.dtype(np.float64)}
_CODES = {v: k for k, v in _DTYPES.items()}


class SnapshotError(Exception):
    """A snapshot file that must not be used (corrupt, truncated, foreign, or missing a page)."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves the old content or the new, never a mix: temp file, fsync, rename. A
    crash leaves the temp file behind (`remove_stale_temps` deletes it at the next start); nothing reads it. The
    file is private to the daemon's user (0600, directories created 0700)."""
    nth = next(_writes)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{nth}.tmp")     # unique: two threads may write one page
    half = len(data) // 2
    try:
        _crash_point("before-write", nth, path)
        # 0600: a snapshot holds a conversation (its messages and the model state that encodes it).
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
            f.write(memoryview(data)[:half])
            f.flush()
            _crash_point("mid-write", nth, path)
            f.write(memoryview(data)[half:])
            f.flush()
            _crash_point("after-write", nth, path)
            os.fsync(f.fileno())
        _crash_point("after-fsync", nth, path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _crash_point("after-rename", nth, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(root: Path) -> int:
    """Delete the temp files that writes interrupted by a crash left under `root`; returns how many. A temp file of
    a process still running (another daemon sharing the cache directory) is left alone."""
    n = 0
    for tmp in Path(root).rglob(".*.tmp"):
        m = _TEMP_NAME.search(tmp.name)
        if m is None or (int(m[1]) != os.getpid() and _alive(int(m[1]))):
            continue
        tmp.unlink(missing_ok=True)
        n += 1
    return n


_TEMP_NAME = re.compile(r"\.(\d+)(?:\.\d+)?\.tmp$")      # .<name>.<pid>.<nth>.tmp (.<name>.<pid>.tmp before)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process
        return True
    return True


# A test hook, off unless the environment sets it: DS4_TEST_CRASH_AT="<point>:<n>" makes the process SIGKILL itself
# at <point> of its n-th atomic write (counted from 1 over every file, pages included), after naming the file on
# stderr. The points, in order: before-write (no temp file yet), mid-write (half of the bytes written),
# after-write (all written, not fsynced), after-fsync (not renamed yet), after-rename (directory not fsynced).
# tests/test_reliability.py and bench/fault_injection.py stop the daemon at exact places inside snapshot writes
# with it; unset, it costs one string comparison per point.
CRASH_POINTS = ("before-write", "mid-write", "after-write", "after-fsync", "after-rename")
_CRASH_AT = os.environ.get("DS4_TEST_CRASH_AT")
_writes = itertools.count(1)        # next() on it is atomic: the engine's worker and writer threads both write


def _crash_point(point: str, nth: int, path: Path) -> None:
    if _CRASH_AT is not None and _CRASH_AT == f"{point}:{nth}":
        os.write(2, f"DS4_TEST_CRASH_AT: SIGKILL at {point} of write {nth} ({path})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


class PageStore:
    """Content-addressed files of full row-store pages, shared by every snapshot that references them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        # Held while a snapshot's pages and then its file are written, and while unreferenced pages are collected.
        self.lock = threading.Lock()

    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.root / h[:2] / h

    def put(self, page: np.ndarray) -> bytes:
        data = np.ascontiguousarray(page).tobytes()
        digest = hashlib.sha256(data).digest()
        p = self.path(digest)
        if not p.exists():
            atomic_write(p, data)
        return digest

    def get(self, digest: bytes, dtype: np.dtype, width: int) -> np.ndarray:
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except OSError:
            raise SnapshotError(f"page {digest.hex()[:16]} is missing") from None
        if hashlib.sha256(data).digest() != digest or len(data) != PAGE_ROWS * width * dtype.itemsize:
            raise SnapshotError(f"page {digest.hex()[:16]} is corrupt")
        return np.frombuffer(data, dtype=dtype).reshape(PAGE_ROWS, width).copy()

    def files(self) -> list[Path]:
        """The page files; not the temp files of writes in progress, which another thread may rename at any time."""
        return [p for p in self.root.glob("??/*") if len(p.name) == 64]

    def digests(self) -> set[bytes]:
        return {bytes.fromhex(p.name) for p in self.files()}

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def remove(self, digest: bytes) -> None:
        self.path(digest).unlink(missing_ok=True)


# --- state <-> arrays ------------------------------------------------------------------------------------------

def _state_arrays(state: SessionState) -> tuple[list[np.ndarray], list[RowStore]]:
    """The state as (tail arrays, row stores), in file order. A row store contributes its partial last page to
    the tail and its full pages as page references."""
    arrays, stores = [], []
    for layer in state.layers:
        arrays.append(layer.raw)
        for store, kv, score in ((layer.comp, layer.comp_kv, layer.comp_score),
                                 (layer.idx, layer.idx_kv, layer.idx_score)):
            if store is None:
                continue
            arrays += [kv, score, np.array([store.n], np.int64)]
            full = store.n // PAGE_ROWS
            arrays.append(store.pages[full][:store.n % PAGE_ROWS] if store.n % PAGE_ROWS else
                          np.zeros((0, store.width), store.dtype))
            stores.append(store)
    return arrays, stores


def _pack_array(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    code = _CODES.get(a.dtype, 3 if a.dtype == np.int64 else None)
    if code is None:
        raise ValueError(f"cannot store arrays of {a.dtype}")
    return struct.pack(f"<BB{a.ndim}Q", code, a.ndim, *a.shape) + a.tobytes()


def _unpack_arrays(buf: bytes) -> list[np.ndarray]:
    out, p = [], 0
    while p < len(buf):
        code, ndim = struct.unpack_from("<BB", buf, p)
        shape = struct.unpack_from(f"<{ndim}Q", buf, p + 2)
        p += 2 + 8 * ndim
        dtype = np.dtype(np.int64) if code == 3 else _DTYPES[code]
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if p + n > len(buf):
            raise SnapshotError("state payload is truncated")
        out.append(np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize, offset=p).reshape(shape).copy())
        p += n
    return out


# --- snapshot files --------------------------------------------------------------------------------------------

def write_snapshot(path: Path, fingerprint: str, tokens: list[int], state: SessionState, meta: dict,
                   pages: PageStore) -> int:
    """Write a snapshot (pages first, then the file that references them); returns the file's size."""
    arrays, stores = _state_arrays(state)
    tail = b"".join(_pack_array(a) for a in arrays)
    blob = json.dumps(meta, ensure_ascii=False).encode()
    with pages.lock:        # until the file is in place, its new pages are referenced by nothing
        digests = [pages.put(p) for store in stores for p in store.pages[:store.n // PAGE_ROWS]]
        data = _snapshot_bytes(fingerprint, tokens, blob, tail, digests)
        atomic_write(path, data)
    return len(data)


def _snapshot_bytes(fingerprint: str, tokens: list[int], blob: bytes, tail: bytes, digests: list[bytes]) -> bytes:
    body = io.BytesIO()
    body.write(_HEADER.pack(MAGIC, VERSION, fingerprint.encode().ljust(64, b"\0"), len(tokens), len(blob),
                            len(tail), len(digests)))
    body.write(np.asarray(tokens, dtype="<i4").tobytes())
    body.write(blob)
    body.write(tail)
    body.write(b"".join(digests))
    data = body.getvalue()
    return data + hashlib.sha256(data).digest()


def read_header(path: Path, fingerprint: str | None = None) -> tuple[list[int], dict]:
    """(tokens, meta) of a snapshot file, after checking its framing, checksum and fingerprint."""
    data = _read_verified(path, fingerprint)
    _, _, _, n_tok, n_json, _, _ = _HEADER.unpack_from(data)
    tokens = np.frombuffer(data, "<i4", n_tok, _HEADER.size).tolist()
    meta = json.loads(data[_HEADER.size + 4 * n_tok:_HEADER.size + 4 * n_tok + n_json])
    return tokens, meta


def page_refs(path: Path) -> list[bytes]:
    """The page digests a snapshot file references (for garbage collection of page files)."""
    data = _read_verified(path, None)
    _, _, _, n_tok, n_json, n_tail, n_refs = _HEADER.unpack_from(data)
    at = _HEADER.size + 4 * n_tok + n_json + n_tail
    return [data[at + 32 * i:at + 32 * (i + 1)] for i in range(n_refs)]


def read_snapshot(path: Path, fingerprint: str, template: SessionState, pages: PageStore
                  ) -> tuple[list[int], SessionState, dict]:
    """Load a snapshot into a state shaped like `template` (a fresh state of the same model)."""
    data = _read_verified(path, fingerprint)
    _, _, _, n_tok, n_json, n_tail, n_refs = _HEADER.unpack_from(data)
    at = _HEADER.size
    tokens = np.frombuffer(data, "<i4", n_tok, at).tolist()
    at += 4 * n_tok
    meta = json.loads(data[at:at + n_json])
    at += n_json
    arrays = _unpack_arrays(data[at:at + n_tail])
    at += n_tail
    digests = [data[at + 32 * i:at + 32 * (i + 1)] for i in range(n_refs)]
    want, stores = _state_arrays(template)
    if len(arrays) != len(want):
        raise SnapshotError("state layout does not match the model")
    layers, it, dit = [], iter(arrays), iter(digests)
    for tl in template.layers:
        layer = LayerState(raw=_expect(next(it), tl.raw))
        for name in ("comp", "idx"):
            store = getattr(tl, name)
            if store is None:
                continue
            kv, score = _expect(next(it), getattr(tl, name + "_kv")), _expect(next(it), getattr(tl, name + "_score"))
            n = int(next(it)[0])
            partial = next(it)
            full = [pages.get(next(dit, b""), store.dtype, store.width) for _ in range(n // PAGE_ROWS)]
            if len(partial) != n % PAGE_ROWS:
                raise SnapshotError("row store tail does not match its count")
            restored = RowStore(store.width, store.dtype, full, n - len(partial))
            restored.append(partial)
            setattr(layer, name, restored)
            setattr(layer, name + "_kv", kv)
            setattr(layer, name + "_score", score)
        layers.append(layer)
    if next(dit, None) is not None:
        raise SnapshotError("page references do not match the row counts")
    return tokens, SessionState(layers, len(tokens)), meta


def _expect(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    if a.shape != like.shape or a.dtype != like.dtype:
        raise SnapshotError(f"state array {a.dtype}{a.shape} where {like.dtype}{like.shape} was expected")
    return a


def _read_verified(path: Path, fingerprint: str | None) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SnapshotError(f"cannot read: {e.strerror or e}") from None
    if len(data) < _HEADER.size + 32:
        raise SnapshotError("file is truncated")
    magic, version, fp, n_tok, n_json, n_tail, n_refs = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a ds4 snapshot (bad magic)")
    if version != VERSION:
        raise SnapshotError(f"snapshot format version {version}, expected {VERSION}")
    if len(data) != _HEADER.size + 4 * n_tok + n_json + n_tail + 32 * n_refs + 32:
        raise SnapshotError("file is truncated or has trailing bytes")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise SnapshotError("checksum mismatch")
    if fingerprint is not None and fp.rstrip(b"\0").decode(errors="replace") != fingerprint:
        raise SnapshotError("written by a different model or numerics (fingerprint mismatch)")
    return data
