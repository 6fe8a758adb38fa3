"""A GGUF file's header, read straight from the mapped file: key/value pairs and the tensor table.
(The `gguf` package's reader parses every tokenizer array and takes ~20 s on Gemma 3; only its
type tables are used.)
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Header:
    """A GGUF file's key/value pairs and tensor table, read straight from the mapped file."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        try:
            if self.buf[:4] != b"GGUF":
                raise UserError(f"{path}: not a GGUF file")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.buf, 4)
            if version < 2:
                raise UserError(f"{path}: GGUF version {version} is too old")
            self.pos = 24
            self.kv = {}
            for _ in range(n_kv):
                key = self._str()
                self.kv[key] = self._value(self._u32())
            self.tensors = []  # (name, n_elements, ggml type)
            for _ in range(n_tensors):
                name = self._str()
                n_dims = self._u32()
                dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
                self.pos += 8 * n_dims
                ttype = self._u32()
                self.pos += 8  # data offset
                self.tensors.append((name, math.prod(dims), ttype))
        except struct.error:
            raise UserError(f"{path}: truncated GGUF header") from None
        finally:
            self.buf.close()

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def _str(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        s = bytes(self.buf[self.pos + 8:self.pos + 8 + n])
        self.pos += 8 + n
        return s.decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._str()
        if vtype == 9:  # array: kept as its length, and its values when they are numbers
            etype = self._u32()
            (n,) = struct.unpack_from("<Q", self.buf, self.pos)
            self.pos += 8
            if etype == 8:
                for _ in range(n):
                    (m,) = struct.unpack_from("<Q", self.buf, self.pos)
                    self.pos += 8 + m
                return _Array(n, None)
            if etype == 9:
                raise UserError("nested GGUF arrays are not supported")
            fmt = _TYPES[etype]
            size = struct.calcsize(fmt)
            values = struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos) if n <= 4096 else None
            self.pos += size * n
            return _Array(n, values)
        fmt = _TYPES[vtype]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v


@dataclass(frozen=True)
class _Array:
    n: int
    values: tuple | None


def _gguf_params(path: Path) -> tuple[int, int]:
    h = _Header(path)
    total = sum(n for _, n, _ in h.tensors)
    embed = sum(n for name, n, _ in h.tensors if name in ("token_embd.weight", "output.weight"))
    return total, embed
