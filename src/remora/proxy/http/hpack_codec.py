"""HPACK (RFC 7541) header compression, compiled: the encoder and decoder behind our HTTP/2 codecs.

Owns: :class:`Encoder` and :class:`Decoder`, each one side of a connection's compression
context (the dynamic table, its size limits), and Huffman coding (:func:`huffman_encode`,
:func:`huffman_decode`) with tables built at import time from the code table of RFC 7541
Appendix B (read from the ``hpack`` package, which ``h2`` already depends on).
Must not: know about frames, streams or HTTP semantics (pseudo-headers, validation): ``h2``
does that, and calls these objects where it would call ``hpack``'s.

Why not ``hpack``: in pure Python it was about a third of the HTTP/2 codec's cost per request
(integer and string coding byte by byte, a debug log call per field). These classes keep its
interface as far as ``h2`` uses it (``Encoder.encode(headers)``, ``Encoder.header_table_size``,
``Decoder.decode(block, raw=True)``, ``Decoder.max_header_list_size``,
``Decoder.max_allowed_table_size``) and raise its exceptions, which ``h2`` turns into
connection errors (``OversizedHeaderListError`` into ``DenialOfServiceError``).

Decoder rules (RFC 7541 §4, §5, §6): every representation; a dynamic table size update only
before the block's first field and never above the limit we advertised; index 0 and indexes
past the tables refused; integers longer than 2^32 refused; Huffman strings that hold EOS, pad
with more than 7 bits or with anything but ones refused; the decoded header list bounded by
``max_header_list_size`` (names, values and 32 octets each, RFC 9113 §6.5.2), checked as it
grows.

Encoder choices (any are valid HPACK; these are what nghttp2, Envoy's codec, does in spirit):
a field in the static or dynamic table is sent as an index; ``authorization``,
``proxy-authorization`` and cookies under 20 octets are never indexed (RFC 7541 §7.1.3, as
``h2``'s outbound normalisation marked them); other fields are added to the dynamic table
unless larger than it; a string is Huffman-coded when that is shorter. The table is at most
4 KiB whatever the peer allows; a peer's smaller ``SETTINGS_HEADER_TABLE_SIZE`` is acknowledged
at the start of the next block with the smallest size it went through, then the final one
(§4.2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

DEFAULT_TABLE_SIZE: Final = 4096
DEFAULT_MAX_HEADER_LIST_SIZE: Final = 65536
_ENTRY_OVERHEAD: Final = 32          # §4.1
_MAX_INT: Final = 1 << 32            # no field, index or size of ours comes near

# ----------------------------------------------------------------------------- static table

_STATIC: Final[list[tuple[bytes, bytes]]] = [(n, v) for n, v in HeaderTable.STATIC_TABLE]
_STATIC_LEN: Final = len(_STATIC)    # 61
_STATIC_FIELD: Final[dict[tuple[bytes, bytes], int]] = {}
_STATIC_NAME: Final[dict[bytes, int]] = {}
for _i, _f in enumerate(_STATIC, 1):
    _STATIC_FIELD.setdefault(_f, _i)
    _STATIC_NAME.setdefault(_f[0], _i)

# ----------------------------------------------------------------------------- Huffman

_CODES: Final[list[int]] = list(REQUEST_CODES)
_LENGTHS: Final[list[int]] = list(REQUEST_CODES_LENGTH)
_EOS: Final = 256


def _decoder_tables() -> tuple[list[int], list[bool]]:
    """A 4-bit-at-a-time decoder for the canonical code: one state per internal node of the
    code tree. ``table[state * 16 + nibble]`` is -1 (the nibble completes EOS: an error) or
    ``next_state << 9 | emitted << 8 | symbol``; no code is shorter than 5 bits, so a nibble
    completes at most one symbol. ``accept[state]``: the bits since the last symbol may end
    the string (at most 7 of them, all ones: a prefix of EOS, §5.2)."""
    left: list[int] = [-1]
    right: list[int] = [-1]
    leaf: list[int] = [-1]
    for sym in range(257):
        code, length = _CODES[sym], _LENGTHS[sym]
        node = 0
        for k in range(length - 1, -1, -1):
            branch = right if (code >> k) & 1 else left
            nxt = branch[node]
            if nxt < 0:
                nxt = len(leaf)
                left.append(-1)
                right.append(-1)
                leaf.append(-1)
                branch[node] = nxt
            node = nxt
        leaf[node] = sym
    internal = [n for n in range(len(leaf)) if leaf[n] < 0]
    state_of = {n: s for s, n in enumerate(internal)}
    table: list[int] = []
    for n in internal:
        for nibble in range(16):
            node, sym, failed = n, -1, False
            for k in (3, 2, 1, 0):
                node = right[node] if (nibble >> k) & 1 else left[node]
                if leaf[node] >= 0:
                    if leaf[node] == _EOS:
                        failed = True
                        break
                    sym = leaf[node]
                    node = 0
            table.append(-1 if failed else
                         state_of[node] << 9 | (256 | sym if sym >= 0 else 0))
    accept = [False] * len(internal)
    node, depth = 0, 0
    while depth <= 7 and leaf[node] < 0:        # the all-ones path from the root
        accept[state_of[node]] = True
        node, depth = right[node], depth + 1
    return table, accept


_DECODE, _ACCEPT = _decoder_tables()


def huffman_encoded_length(data: bytes) -> int:
    bits = 0
    for b in data:
        bits += _LENGTHS[b]
    return (bits + 7) >> 3


def huffman_encode(data: bytes) -> bytes:
    """``data`` in the Huffman code, padded with ones (a prefix of EOS)."""
    out = bytearray()
    acc = 0
    bits = 0
    for b in data:
        n = _LENGTHS[b]
        acc = (acc << n) | _CODES[b]
        bits += n
        while bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
        acc &= (1 << bits) - 1
    if bits:
        out.append(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) & 0xFF)
    return bytes(out)


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    state = 0
    for b in data:
        e = _DECODE[(state << 4) | (b >> 4)]
        if e < 0:
            raise HPACKDecodingError("EOS in a Huffman-coded string")
        if e & 256:
            out.append(e & 0xFF)
        e = _DECODE[((e >> 9) << 4) | (b & 15)]
        if e < 0:
            raise HPACKDecodingError("EOS in a Huffman-coded string")
        if e & 256:
            out.append(e & 0xFF)
        state = e >> 9
    if not _ACCEPT[state]:
        raise HPACKDecodingError("bad padding in a Huffman-coded string")
    return bytes(out)


# ----------------------------------------------------------------------------- integers


def _put_int(out: bytearray, first: int, prefix: int, value: int) -> None:
    """``value`` with an N-bit prefix (§5.1); ``first`` holds the representation's bits."""
    mask = (1 << prefix) - 1
    if value < mask:
        out.append(first | value)
        return
    out.append(first | mask)
    value -= mask
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_plain(out: bytearray, data: bytes) -> None:
    _put_int(out, 0, 7, len(data))
    out += data


def _put_str(out: bytearray, data: bytes) -> None:
    """``data`` Huffman-coded when that is shorter, else as it is."""
    hlen = huffman_encoded_length(data)
    if hlen < len(data):
        _put_int(out, 0x80, 7, hlen)
        out += huffman_encode(data)
    else:
        _put_plain(out, data)


# ----------------------------------------------------------------------------- encoder


class Encoder:
    """One connection's sending context. ``header_table_size`` is what the peer's
    ``SETTINGS_HEADER_TABLE_SIZE`` allows (h2 sets it when the setting arrives)."""

    def __init__(self) -> None:
        # Dynamic table entries, oldest first; entry number ``k`` (counted from 0 over the
        # connection's life) sits at ``_names[k - _evicted]``.
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._evicted = 0
        self._size = 0
        self._max = DEFAULT_TABLE_SIZE
        # newest entry number of each field and of each name still in the table
        self._field_at: dict[tuple[bytes, bytes], int] = {}
        self._name_at: dict[bytes, int] = {}
        self._update_min = -1            # a size change to announce: smallest, then final
        self._update_final = -1

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value < 0:
            raise InvalidTableSizeError(f"table size {value}")
        # An encoder may use less than the peer allows (RFC 7541 §4.2); more than 4 KiB
        # (nghttp2's deflater default) would let a peer make us keep up to 4 GiB of the fields
        # we send on one connection.
        value = min(value, DEFAULT_TABLE_SIZE)
        if value == self._max and self._update_final < 0:
            return
        self._update_min = value if self._update_min < 0 else min(self._update_min, value)
        self._update_final = value
        self._max = value
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max:
            name = self._names.pop(0)
            value = self._values.pop(0)
            k = self._evicted
            self._evicted += 1
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
            if self._field_at.get((name, value)) == k:
                del self._field_at[(name, value)]
            if self._name_at.get(name) == k:
                del self._name_at[name]

    def _add(self, name: bytes, value: bytes) -> None:
        k = self._evicted + len(self._names)
        self._names.append(name)
        self._values.append(value)
        self._size += len(name) + len(value) + _ENTRY_OVERHEAD
        self._field_at[(name, value)] = k
        self._name_at[name] = k
        self._evict()

    def _index_of(self, k: int) -> int:
        """The HPACK index of dynamic entry number ``k`` (the newest is 62)."""
        return _STATIC_LEN + self._evicted + len(self._names) - k

    def encode(self, headers: Iterable[Sequence[bytes | str]], huffman: bool = True) -> bytes:
        """One header block. ``headers``: (name, value) pairs, as ``h2`` passes them
        (``hpack``'s :class:`NeverIndexedHeaderTuple` is honoured). Typed as sequences, not
        tuples: compiled, a tuple parameter would be unboxed and lose its class."""
        out = bytearray()
        if self._update_final >= 0:
            if self._update_min < self._update_final:
                _put_int(out, 0x20, 5, self._update_min)
            _put_int(out, 0x20, 5, self._update_final)
            self._update_min = self._update_final = -1
        for field in headers:
            n, v = field[0], field[1]
            name = n if isinstance(n, bytes) else n.encode("utf-8")
            value = v if isinstance(v, bytes) else v.encode("utf-8")
            key = (name, value)
            idx = _STATIC_FIELD.get(key, 0)
            if idx:
                _put_int(out, 0x80, 7, idx)
                continue
            k = self._field_at.get(key, -1)
            if k >= 0:
                _put_int(out, 0x80, 7, self._index_of(k))
                continue
            idx = _STATIC_NAME.get(name, 0)
            if not idx:
                k = self._name_at.get(name, -1)
                if k >= 0:
                    idx = self._index_of(k)
            if (isinstance(field, NeverIndexedHeaderTuple) or name == b"authorization"
                    or name == b"proxy-authorization"
                    or (name == b"cookie" and len(value) < 20)):
                first, prefix = 0x10, 4                         # never indexed
            elif len(name) + len(value) + _ENTRY_OVERHEAD > self._max:
                first, prefix = 0x00, 4                         # without indexing
            else:
                first, prefix = 0x40, 6                         # incremental indexing
            _put_int(out, first, prefix, idx)
            if huffman:
                if not idx:
                    _put_str(out, name)
                _put_str(out, value)
            else:
                if not idx:
                    _put_plain(out, name)
                _put_plain(out, value)
            if first == 0x40:
                self._add(name, value)
        return bytes(out)


# ----------------------------------------------------------------------------- decoder


class Decoder:
    """One connection's receiving context. ``max_allowed_table_size`` is our advertised
    ``SETTINGS_HEADER_TABLE_SIZE`` (h2 sets it once the peer acknowledged it): the most the
    peer's encoder may make the table."""

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self._names: list[bytes] = []     # newest last
        self._values: list[bytes] = []
        self._size = 0
        self._max = DEFAULT_TABLE_SIZE
        self._data = b""
        self._pos = 0

    @property
    def header_table_size(self) -> int:
        return self._max

    def _evict(self) -> None:
        while self._size > self._max:
            self._size -= len(self._names.pop(0)) + len(self._values.pop(0)) + _ENTRY_OVERHEAD

    def _int(self, prefix: int) -> int:
        data = self._data
        pos = self._pos
        mask = (1 << prefix) - 1
        value = data[pos] & mask
        pos += 1
        if value == mask:
            shift = 0
            while True:
                if pos >= len(data):
                    raise HPACKDecodingError("truncated integer")
                b = data[pos]
                pos += 1
                value += (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
                if shift > 28:
                    raise HPACKDecodingError("integer too long")
            if value > _MAX_INT:
                raise HPACKDecodingError("integer too large")
        self._pos = pos
        return value

    def _str(self) -> bytes:
        data = self._data
        if self._pos >= len(data):
            raise HPACKDecodingError("truncated string")
        huff = data[self._pos] & 0x80
        length = self._int(7)
        start = self._pos
        end = start + length
        if end > len(data):
            raise HPACKDecodingError("truncated string")
        self._pos = end
        raw = data[start:end]
        return huffman_decode(raw) if huff else raw

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise InvalidTableIndex("index 0")
        if index <= _STATIC_LEN:
            return _STATIC[index - 1]
        d = index - _STATIC_LEN
        n = len(self._names)
        if d > n:
            raise InvalidTableIndex(f"index {index} beyond the table")
        return self._names[n - d], self._values[n - d]

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        """The header list of one header block (as bytes: ``raw`` is h2's argument and
        always true here)."""
        self._data = bytes(data)
        self._pos = 0
        end = len(self._data)
        out: list[tuple[bytes, bytes]] = []
        total = 0
        first = True
        try:
            while self._pos < end:
                b = self._data[self._pos]
                if b & 0x80:                                   # indexed field
                    name, value = self._field(self._int(7))
                elif b & 0xE0 == 0x20:                         # table size update
                    if not first:
                        raise HPACKDecodingError("table size update after a field")
                    size = self._int(5)
                    if size > self.max_allowed_table_size:
                        raise InvalidTableSizeError(
                            f"table size {size} above the {self.max_allowed_table_size} "
                            "allowed")
                    self._max = size
                    self._evict()
                    continue
                else:                                          # literal
                    indexing = b & 0xC0 == 0x40
                    idx = self._int(6 if indexing else 4)
                    name = self._field(idx)[0] if idx else self._str()
                    value = self._str()
                    if indexing:
                        self._names.append(name)
                        self._values.append(value)
                        self._size += len(name) + len(value) + _ENTRY_OVERHEAD
                        self._evict()
                first = False
                total += len(name) + len(value) + _ENTRY_OVERHEAD
                if total > self.max_header_list_size:
                    raise OversizedHeaderListError(
                        f"header list over {self.max_header_list_size} octets")
                out.append((name, value))
        finally:
            self._data = b""
        return out
