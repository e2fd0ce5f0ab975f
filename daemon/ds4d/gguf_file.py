"""Open and validate a GGUF file, memory-mapped, through the `gguf` package.

Owns the container level: magic, version (3 only), metadata values, the tensor directory, and the check that
every tensor's bytes lie inside the file. Opening maps the file and parses only its header: tensor data is never
read here, so opening the real 81 GB file costs a few hundred milliseconds and no resident memory.

It knows nothing about DeepSeek V4 (that is `shape.py` and `weights.py`). Every problem is a `ModelError` whose
message is one line naming the file; the CLI prints it and exits non-zero.

Why a subclass of `gguf.GGUFReader`: the stock reader builds two numpy views per element of every metadata
array (6-7 s for the 129,280-token vocabulary and its merges) and trusts every length in the file, so a flipped
byte in an array length makes it walk the whole file. `_CheckedReader` decodes metadata arrays in one pass,
bounds every length by the bytes that remain, and checks tensor extents before any view is made.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType, GGML_QUANT_SIZES
from gguf.gguf_reader import ReaderField

GGUF_VERSION = 3


class ModelError(Exception):
    """A model file that cannot be used. str(e) is one line that names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    dims: tuple[int, ...]      # GGUF order: dims[0] (ne0) is the contiguous one
    nbytes: int
    offset: int                # absolute file offset of the first byte
    data: np.ndarray           # read-only view: float arrays for F32/F16/I32, raw uint8 rows otherwise

    @property
    def type_name(self) -> str:
        return self.type.name


# Sizes of the fixed-width metadata scalars, and the numpy dtypes of their little-endian encodings.
_SCALARS: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("?"),
}


def _py(values: np.ndarray) -> list:
    """numpy scalars -> python values. float32 values become the shortest decimal that round-trips in float32
    (1e-6 stays 1e-06 rather than 9.999999974752427e-07), as the file's author wrote them."""
    if values.dtype == np.float32:
        return [float(np.format_float_positional(v, unique=True, trim="-")) for v in values]
    return values.tolist()


class _CheckedReader(GGUFReader):
    """GGUFReader with bounded, fast metadata parsing and tensor-extent checks (see the module docstring).

    Decoded metadata values are kept in `self.values` (key -> python value: int, float, bool, str, or a list of
    them); `self.value_types` keeps each key's GGUF type, and the element type of arrays.
    """

    def __init__(self, path: str):
        self.values: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        super().__init__(path, "r")

    # --- metadata -------------------------------------------------------------------------------------------
    def _need(self, offs: int, n: int, what: str) -> None:
        if n < 0 or offs + n > len(self.data):
            raise ValueError(f"{what} runs past the end of the file (offset {offs}, {n} bytes)")

    def _read_str(self, offs: int, what: str) -> tuple[str, int]:
        self._need(offs, 8, what)
        n = int(self.data[offs:offs + 8].view("<u8")[0])
        self._need(offs + 8, n, what)
        return bytes(self.data[offs + 8:offs + 8 + n]).decode("utf-8", errors="replace"), 8 + n

    def _read_value(self, offs: int, vtype: GGUFValueType, key: str) -> tuple[Any, int, GGUFValueType | None]:
        """Decode one value; returns (value, size in bytes, array element type or None)."""
        if vtype == GGUFValueType.STRING:
            s, size = self._read_str(offs, f"metadata {key!r}")
            return s, size, None
        if vtype in _SCALARS:
            dt = _SCALARS[vtype]
            self._need(offs, dt.itemsize, f"metadata {key!r}")
            return _py(self.data[offs:offs + dt.itemsize].view(dt))[0], dt.itemsize, None
        if vtype != GGUFValueType.ARRAY:
            raise ValueError(f"metadata {key!r} has unknown value type {int(vtype)}")
        self._need(offs, 12, f"metadata {key!r}")
        itype = GGUFValueType(int(self.data[offs:offs + 4].view("<u4")[0]))
        count = int(self.data[offs + 4:offs + 12].view("<u8")[0])
        body = offs + 12
        if itype in _SCALARS:
            dt = _SCALARS[itype]
            self._need(body, count * dt.itemsize, f"metadata array {key!r}")
            return _py(self.data[body:body + count * dt.itemsize].view(dt)), 12 + count * dt.itemsize, itype
        if itype != GGUFValueType.STRING:
            raise ValueError(f"metadata array {key!r} has unsupported element type {itype.name}")
        # Every string costs at least its 8-byte length: a corrupt count cannot make us walk past the file.
        self._need(body, count * 8, f"metadata array {key!r}")
        buf = memoryview(self.data)
        end_of_file = len(self.data)
        out, p = [], body
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if p + 8 > end_of_file:
                raise ValueError(f"metadata array {key!r} runs past the end of the file")
            (n,) = unpack(buf, p)
            if p + 8 + n > end_of_file:
                raise ValueError(f"metadata array {key!r} runs past the end of the file")
            out.append(bytes(buf[p + 8:p + 8 + n]).decode("utf-8", errors="replace"))
            p += 8 + n
        return out, p - offs, itype

    def _build_fields(self, offs: int, count: int) -> int:
        # Each key-value costs at least 8 (key length) + 4 (type) + 1 bytes. (Python ints: no uint64 wrap-around.)
        count = int(count)
        if count * 13 > len(self.data) - offs:
            raise ValueError(f"metadata count {count} is larger than the file can hold")
        for _ in range(count):
            orig = offs
            key, size = self._read_str(offs, "metadata key")
            offs += size
            self._need(offs, 4, f"metadata {key!r}")
            raw_type = self.data[offs:offs + 4].view("<u4")
            try:
                vtype = GGUFValueType(int(raw_type[0]))
            except ValueError:
                raise ValueError(f"metadata {key!r} has unknown value type {int(raw_type[0])}") from None
            offs += 4
            value, size, itype = self._read_value(offs, vtype, key)
            if key in self.values:
                raise ValueError(f"duplicate metadata key {key!r}")
            self.values[key] = value
            self.value_types[key] = (vtype, itype)
            # The base class reads general.alignment back from a ReaderField: give scalars their usual parts.
            parts = [raw_type, self.data[offs:offs + size].view(_SCALARS[vtype])] if vtype in _SCALARS else [raw_type]
            self._push_field(ReaderField(orig, key, parts, [len(parts) - 1], [vtype]), skip_sum=True)
            offs += size
        return offs

    # --- tensor directory -----------------------------------------------------------------------------------
    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[ReaderField]]:
        # Each tensor info costs at least 8 (name length) + 4 + 4 + 8 bytes.
        count = int(count)
        if count * 24 > len(self.data) - offs:
            raise ValueError(f"tensor count {count} is larger than the file can hold")
        fields = []
        for _ in range(count):
            name, size = self._read_str(offs, "tensor name")
            self._need(offs + size, 4, f"tensor {name!r}")
            n_dims = int(self.data[offs + size:offs + size + 4].view("<u4")[0])
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            self._need(offs + size + 4, 8 * n_dims + 12, f"tensor {name!r}")
            field = self._get_tensor_info_field(offs)
            offs += sum(int(part.nbytes) for part in field.parts)
            fields.append(field)
        return offs, fields

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown type code {int(raw_dtype[0])}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            dims_list = [int(d) for d in dims]
            if any(d == 0 for d in dims_list) or any(d > 1 << 40 for d in dims_list):
                raise ValueError(f"tensor {name!r} has invalid dimensions {dims_list}")
            if dims_list[0] % block:
                raise ValueError(f"tensor {name!r}: first dimension {dims_list[0]} is not a multiple of "
                                 f"the {qtype.name} block size {block}")
            nbytes = int(np.prod(dims_list, dtype=object)) * type_size // block
            begin = start_offs + int(offset_tensor[0])
            if begin % self.alignment:
                raise ValueError(f"tensor {name!r} is not aligned to {self.alignment} bytes")
            if begin + nbytes > len(self.data):
                raise ValueError(f"file is truncated: tensor {name!r} needs bytes up to {begin + nbytes:,} "
                                 f"but the file has {len(self.data):,}")
        super()._build_tensors(start_offs, fields)


class GGUFFile:
    """A validated, memory-mapped GGUF v3 file: `metadata` (key -> value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        name = str(self.path)
        if not self.path.exists():
            raise ModelError(f"{name}: no such file")
        if self.path.is_dir():
            raise ModelError(f"{name}: is a directory, not a GGUF file")
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise ModelError(f"{name}: not a GGUF file ({self.size} bytes)")
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise ModelError(f"{name}: not a GGUF file (bad magic {head[:4]!r})")
        version = struct.unpack("<I", head[4:8])[0]
        if version != GGUF_VERSION:
            raise ModelError(f"{name}: GGUF version {version} is not supported (only version {GGUF_VERSION})")
        try:
            reader = _CheckedReader(name)
        except ModelError:
            raise
        except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error) as e:
            raise ModelError(f"{name}: corrupt GGUF file: {e}") from None
        except OSError as e:
            raise ModelError(f"{name}: cannot read: {e.strerror or e}") from None
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.metadata: dict[str, Any] = reader.values
        self.metadata_types = reader.value_types
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            data = t.data
            data.flags.writeable = False
            self.tensors[t.name] = TensorInfo(
                name=t.name, type=t.tensor_type, dims=tuple(int(d) for d in t.shape), nbytes=int(t.n_bytes),
                offset=int(t.data_offset), data=data)
        self._mmap = reader.data
        self.tensor_bytes = sum(t.nbytes for t in self.tensors.values())   # all weights, as loaded

    def fingerprint(self) -> str:
        """A hex digest that identifies the file's content without reading it all: metadata, tensor directory,
        file size and a few sampled blocks of tensor data (DESIGN.md: never hash the whole 81 GB)."""
        import hashlib
        h = hashlib.sha256()
        h.update(repr(sorted((k, v if not isinstance(v, list) else (len(v), v[:64], v[-64:]))
                             for k, v in self.metadata.items())).encode())
        for t in self.tensors.values():
            h.update(f"{t.name}:{int(t.type)}:{t.dims}:{t.offset}".encode())
        h.update(str(self.size).encode())
        with open(self.path, "rb") as f:
            span = max(self.size - self.data_offset, 1)
            for i in range(16):             # 16 blocks of 4 KiB spread over the data region
                f.seek(self.data_offset + span * i // 16)
                h.update(f.read(4096))
        return h.hexdigest()

    def error(self, problem: str) -> ModelError:
        """A ModelError about this file."""
        return ModelError(f"{self.path}: {problem}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def close(self) -> None:
        """Drop the mapping (views handed out keep it alive until they go too)."""
        self.tensors = {}
        mm = getattr(self._mmap, "_mmap", None)
        self._mmap = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a view still exists; the OS unmaps when it is collected
