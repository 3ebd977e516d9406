"""Kernel relaying of plain TCP sessions with a BPF sockmap (``--tcp-offload``).

Owns: a tiny eBPF assembler (the encodings this module needs, with labels; unit tests check
them against ``llvm-mc``'s), the ``bpf(2)`` calls made through ctypes (``BPF_MAP_CREATE``,
``BPF_PROG_LOAD`` with the verifier's log on failure, ``BPF_PROG_ATTACH``, element
lookup/update/delete), and :class:`SockPairs`, three maps and one program:

* ``socks``, a ``BPF_MAP_TYPE_SOCKHASH`` keyed by socket cookie (``SO_COOKIE``), with the
  ``sk_skb`` verdict program attached (``BPF_SK_SKB_VERDICT``, or ``STREAM_VERDICT`` on
  kernels before 5.13);
* ``index``, a hash from a socket's cookie to its slot;
* ``slots``, an mmap-able array of ``{peer cookie, bytes, limit, stopped}``, one per
  direction of a pair, shared with user space (counters read and limits raised without a
  system call).

For every skb a paired socket receives, the program adds its length to the slot's byte count
and redirects it to the peer's egress (``bpf_sk_redirect_hash``, flags 0) — unless that would
pass the slot's ``limit``: then it sets ``stopped`` and returns ``SK_PASS`` for this skb and
every later one, so the bytes queue on the socket for user space to read (charged to its
receive buffer, so TCP's window closes). That limit is the flow control: an egress redirect
queues without bound in the kernel when the receiver is slow (measured: 2.8 GB queued in 8 s
with no limit), so :mod:`remora.proxy.tcp` keeps each direction's redirected-but-not-yet-sent
bytes under a watermark and relays a direction that reaches it in user space from then on.
A socket with no slot gets ``SK_PASS`` too.
The maps and the program are made by :func:`load` while the process is still root (creating
them needs ``CAP_BPF`` + ``CAP_NET_ADMIN``); adding sockets to a map fd the process already
holds needs no capability, so a worker keeps using them after dropping to uid 1337.
Must not: decide which connections are offloaded, read or write sockets, or handle EOF and
close (that is :mod:`remora.proxy.tcp`); nothing here is called per chunk.

References: ``bpf(2)``, the kernel's ``include/uapi/linux/bpf.h`` (instruction encoding,
``union bpf_attr``, helper numbers), ``Documentation/bpf/map_sockmap.rst``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ assembler
# Instruction classes, sizes, sources and operations from <linux/bpf.h>/<linux/bpf_common.h>.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
K, X = 0x00, 0x08
ADD, MOV = 0x00, 0xB0
JA, JEQ, JGT, JNE, CALL, EXIT = 0x00, 0x10, 0x20, 0x50, 0x80, 0x90
PSEUDO_MAP_FD = 1

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
_SIZES = {1: B, 2: H, 4: W, 8: DW}


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn`` (8 bytes, little-endian; dst in the low nibble)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov64_reg(dst: int, src: int) -> bytes:
    return insn(ALU64 | MOV | X, dst, src)


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(ALU64 | MOV | K, dst, 0, 0, imm)


def add64_imm(dst: int, imm: int) -> bytes:
    return insn(ALU64 | ADD | K, dst, 0, 0, imm)


def ldx_mem(size: int, dst: int, src: int, off: int) -> bytes:
    """``dst = *(size *)(src + off)``"""
    return insn(LDX | MEM | _SIZES[size], dst, src, off)


def stx_mem(size: int, dst: int, src: int, off: int) -> bytes:
    """``*(size *)(dst + off) = src``"""
    return insn(STX | MEM | _SIZES[size], dst, src, off)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """``dst = map`` (the two-slot ``BPF_LD | BPF_DW | BPF_IMM`` with ``BPF_PSEUDO_MAP_FD``)."""
    return insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd) + insn(0)


def jeq_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(JMP | JEQ | K, dst, 0, off, imm)


def call(helper: int) -> bytes:
    return insn(JMP | CALL, 0, 0, 0, helper)


def exit_() -> bytes:
    return insn(JMP | EXIT)


def jgt_reg(dst: int, src: int, off: int) -> bytes:
    return insn(JMP | JGT | X, dst, src, off)


def jne_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(JMP | JNE | K, dst, 0, off, imm)


def st_imm(size: int, dst: int, off: int, imm: int) -> bytes:
    """``*(size *)(dst + off) = imm``"""
    return insn(ST | MEM | _SIZES[size], dst, 0, off, imm)


def add64_reg(dst: int, src: int) -> bytes:
    return insn(ALU64 | ADD | X, dst, src)


Jump = Callable[[int], bytes]       # an instruction whose offset is filled in by assemble()


def assemble(items: Sequence[bytes | str | tuple[Jump, str]]) -> bytes:
    """Lay out instructions (``bytes``), labels (``str``) and jumps to labels (``(make, label)``
    where ``make(off)`` encodes the jump with offset ``off``)."""
    labels: dict[str, int] = {}
    pc = 0
    for item in items:
        if isinstance(item, str):
            labels[item] = pc
        elif isinstance(item, bytes):
            pc += len(item) // 8
        else:
            pc += 1
    out = bytearray()
    for item in items:
        if isinstance(item, str):
            continue
        if isinstance(item, bytes):
            out += item
        else:
            make, label = item
            out += make(labels[label] - (len(out) // 8 + 1))
    return bytes(out)


# Helper numbers (enum bpf_func_id) and verdicts.
FN_MAP_LOOKUP_ELEM = 1
FN_GET_SOCKET_COOKIE = 46
FN_SK_REDIRECT_HASH = 72
SK_DROP, SK_PASS = 0, 1

# A slot: one direction of a pair (the socket whose cookie maps to it → its peer), u64 each.
SLOT_PEER, SLOT_BYTES, SLOT_LIMIT, SLOT_STOPPED = 0, 1, 2, 3
SLOT_WORDS = 4


def verdict_program(index_fd: int, slots_fd: int, sockhash_fd: int) -> bytes:
    """The ``sk_skb`` verdict program, per skb a paired socket receives::

        slot = slots[index[cookie(skb)]]          # none: SK_PASS (user space reads it)
        if slot.stopped or skb.len == 0: return SK_PASS
        n = slot.bytes + skb.len
        if n > slot.limit: slot.stopped = 1; return SK_PASS     # for good: see tcp.py
        slot.bytes = n
        return sk_redirect_hash(skb, sockhash, &slot.peer, 0)    # the peer's egress

    An skb without data (a FIN on its own) is not redirected: the kernel would report
    ``EPIPE`` on the peer for its zero-length send (measured on 6.18); user space sees the
    EOF anyway. One socket's skbs are never verdicted concurrently (the socket is locked),
    so the plain add is exact; user space only reads ``bytes``/``stopped`` and raises
    ``limit``.
    """
    return assemble([
        mov64_reg(R6, R1),
        call(FN_GET_SOCKET_COOKIE),
        stx_mem(8, R10, R0, -8),
        ld_map_fd(R1, index_fd),
        mov64_reg(R2, R10),
        add64_imm(R2, -8),
        call(FN_MAP_LOOKUP_ELEM),
        (lambda o: jeq_imm(R0, 0, o), "pass"),
        ldx_mem(4, R1, R0, 0),
        stx_mem(4, R10, R1, -12),
        ld_map_fd(R1, slots_fd),
        mov64_reg(R2, R10),
        add64_imm(R2, -12),
        call(FN_MAP_LOOKUP_ELEM),
        (lambda o: jeq_imm(R0, 0, o), "pass"),
        ldx_mem(8, R1, R0, SLOT_STOPPED * 8),
        (lambda o: jne_imm(R1, 0, o), "pass"),
        ldx_mem(4, R1, R6, 0),                  # __sk_buff.len
        (lambda o: jeq_imm(R1, 0, o), "pass"),  # a bare FIN: see above
        ldx_mem(8, R2, R0, SLOT_BYTES * 8),
        add64_reg(R2, R1),
        ldx_mem(8, R3, R0, SLOT_LIMIT * 8),
        (lambda o: jgt_reg(R2, R3, o), "stop"),
        stx_mem(8, R0, R2, SLOT_BYTES * 8),
        mov64_reg(R3, R0),                      # key: &slot.peer
        mov64_reg(R1, R6),
        ld_map_fd(R2, sockhash_fd),
        mov64_imm(R4, 0),                       # flags 0: the peer's egress
        call(FN_SK_REDIRECT_HASH),
        exit_(),
        "stop",
        st_imm(8, R0, SLOT_STOPPED * 8, 1),
        "pass",
        mov64_imm(R0, SK_PASS),
        exit_(),
    ])


# ------------------------------------------------------------------------------ syscalls
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
MAP_HASH, MAP_SOCKHASH = 1, 18
PROG_SK_SKB = 14
ATTACH_SK_SKB_STREAM_VERDICT, ATTACH_SK_SKB_VERDICT = 5, 38
BPF_ANY, BPF_NOEXIST = 0, 1
SO_COOKIE = 57
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_ATTR_SIZE = 128      # comfortably more than every field set here


class BpfError(OSError):
    """A ``bpf(2)`` call failed; ``log`` is the verifier's output for a program load."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


_libc: ctypes.CDLL | None = None


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise BpfError(errno.ENOSYS, f"{what}: bpf(2) number unknown on {os.uname().machine}")
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr,
                            ctypes.c_uint(len(attr))))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), what)
    return ret


def _attr(fmt: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    raw = struct.pack(fmt, *values)
    return ctypes.create_string_buffer(raw.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str, flags: int = 0) -> int:
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node,
    # map_name[16]
    attr = _attr("=7I16s", map_type, key_size, value_size, max_entries, flags, 0, 0,
                 name.encode()[:15])
    return _sys_bpf(BPF_MAP_CREATE, attr, f"map_create({name})")


def prog_load(prog_type: int, insns: bytes, name: str, expected_attach_type: int = 0) -> int:
    """Load a program; on failure the verifier's log is in the :class:`BpfError`."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16], prog_ifindex, expected_attach_type
    attr = _attr("=IIQQIIQII16sII", prog_type, len(insns) // 8, ctypes.addressof(code),
                 ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0,
                 name.encode()[:15], 0, expected_attach_type)
    for attempt in range(5):
        try:
            return _sys_bpf(BPF_PROG_LOAD, attr, f"prog_load({name})")
        except BpfError as exc:
            if exc.errno == errno.EAGAIN and attempt < 4:
                continue    # the verifier was interrupted; libbpf retries too
            exc.log = log.value.decode(errors="replace")
            raise
    raise AssertionError("unreachable")


def prog_attach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    # target_fd, attach_bpf_fd, attach_type, attach_flags
    _sys_bpf(BPF_PROG_ATTACH, _attr("=4I", target_fd, prog_fd, attach_type, 0),
             "prog_attach")


def _elem(cmd: int, map_fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
          flags: int, what: str) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = 0 if value is None else ctypes.addressof(value)
    # map_fd, pad, key, value, flags
    _sys_bpf(cmd, _attr("=IIQQQ", map_fd, 0, ctypes.addressof(k), v, flags), what)


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, map_fd, key, ctypes.create_string_buffer(value, len(value)),
          flags, "map_update")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(value_size)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, map_fd, key, out, 0, "map_lookup")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return out.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    try:
        _elem(BPF_MAP_DELETE_ELEM, map_fd, key, None, 0, "map_delete")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit cookie of ``sock`` (``SO_COOKIE``), the key of both maps."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


# ------------------------------------------------------------------------------ pairing
_KEY = struct.Struct("=Q")
_U32 = struct.Struct("=I")
BPF_F_MMAPABLE = 1 << 10
MAP_ARRAY = 2


class Pair:
    """Two sockets relayed by the kernel: slot ``2k`` is ``a``→``b``, ``2k + 1`` is ``b``→``a``.
    Its counters are read and its limits raised through the slots' shared memory."""

    __slots__ = ("_words", "base", "cookies", "k")

    def __init__(self, words: memoryview, k: int, cookies: tuple[int, int]) -> None:
        self._words = words
        self.k = k
        self.cookies = cookies
        self.base = (0, 0)   # what tcp.py needs to remember per direction (baselines)

    def _at(self, direction: int, field_: int) -> int:
        return (2 * self.k + direction) * SLOT_WORDS + field_

    def bytes(self, direction: int) -> int:
        """Bytes the kernel has redirected in ``direction`` (0: a→b, 1: b→a)."""
        return int(self._words[self._at(direction, SLOT_BYTES)])

    def limit(self, direction: int) -> int:
        return int(self._words[self._at(direction, SLOT_LIMIT)])

    def set_limit(self, direction: int, limit: int) -> None:
        """Let the kernel redirect up to ``limit`` bytes in total in ``direction``; past it,
        that direction stops for good and its bytes go to user space."""
        self._words[self._at(direction, SLOT_LIMIT)] = limit

    def stopped(self, direction: int) -> bool:
        return bool(self._words[self._at(direction, SLOT_STOPPED)])


class SockPairs:
    """The loaded maps and program of one process (fds kept for the process's life):
    ``index`` (socket cookie → slot), ``slots`` (an mmap-able array of
    ``{peer cookie, bytes, limit, stopped}``), ``socks`` (a sockhash, cookie → socket) with
    the verdict program attached."""

    def __init__(self, index_fd: int, slots_fd: int, sockhash_fd: int, prog_fd: int,
                 capacity: int) -> None:
        self.index_fd = index_fd
        self.slots_fd = slots_fd
        self.sockhash_fd = sockhash_fd
        self.prog_fd = prog_fd
        self.capacity = capacity          # pairs
        size = 2 * capacity * SLOT_WORDS * 8
        self._mmap = mmap.mmap(slots_fd, size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = memoryview(self._mmap).cast("Q")
        self._free = list(range(capacity - 1, -1, -1))
        self.active = 0

    def pair(self, a: socket.socket, b: socket.socket, limit: int) -> Pair | None:
        """Relay ``a`` ⇄ ``b`` in the kernel from now on, up to ``limit`` bytes each way
        (raise it with :meth:`Pair.set_limit`). None when every slot is in use; raises
        :class:`BpfError` (nothing left paired) when a socket cannot be added. The caller
        guarantees that nothing it has accepted for either socket is still unsent."""
        if not self._free:
            return None
        ca, cb = socket_cookie(a), socket_cookie(b)
        k = self._free.pop()
        w = self._words
        for d, peer in ((0, cb), (1, ca)):
            base = (2 * k + d) * SLOT_WORDS
            w[base + SLOT_PEER] = peer
            w[base + SLOT_BYTES] = 0
            w[base + SLOT_LIMIT] = limit
            w[base + SLOT_STOPPED] = 0
        ka, kb = _KEY.pack(ca), _KEY.pack(cb)
        done: list[bytes] = []
        try:
            for key, slot in ((ka, 2 * k), (kb, 2 * k + 1)):
                map_update(self.index_fd, key, _U32.pack(slot))
                done.append(key)
            map_update(self.sockhash_fd, ka, _U32.pack(a.fileno()))
            try:
                map_update(self.sockhash_fd, kb, _U32.pack(b.fileno()))
            except BaseException:
                map_delete(self.sockhash_fd, ka)
                raise
        except BaseException:
            for key in done:
                map_delete(self.index_fd, key)
            self._free.append(k)
            raise
        self.active += 1
        return Pair(w, k, (ca, cb))

    def release(self, pair: Pair) -> None:
        """Forget a pair (its sockets leave the sockhash when they close, or now)."""
        for cookie in pair.cookies:
            key = _KEY.pack(cookie)
            with contextlib.suppress(OSError):
                map_delete(self.index_fd, key)
            with contextlib.suppress(OSError):
                map_delete(self.sockhash_fd, key)
        self._free.append(pair.k)
        self.active -= 1

    def close(self) -> None:
        self._words.release()
        self._mmap.close()
        for fd in (self.prog_fd, self.sockhash_fd, self.slots_fd, self.index_fd):
            os.close(fd)


def load(capacity: int = 8192) -> SockPairs:
    """Create the maps, load and attach the verdict program (needs ``CAP_BPF`` and
    ``CAP_NET_ADMIN``, or root). ``capacity``: pairs at once. Raises :class:`BpfError`
    (with the verifier's log when the program is refused)."""
    fds: list[int] = []
    try:
        index = map_create(MAP_HASH, 8, 4, 2 * capacity, "remora_index")
        fds.append(index)
        slots = map_create(MAP_ARRAY, 4, SLOT_WORDS * 8, 2 * capacity, "remora_slots",
                           BPF_F_MMAPABLE)
        fds.append(slots)
        sockhash = map_create(MAP_SOCKHASH, 8, 4, 2 * capacity, "remora_socks")
        fds.append(sockhash)
        code = verdict_program(index, slots, sockhash)
        prog = -1
        for attach in (ATTACH_SK_SKB_VERDICT, ATTACH_SK_SKB_STREAM_VERDICT):
            try:
                prog = prog_load(PROG_SK_SKB, code, "remora_relay", attach)
                try:
                    prog_attach(sockhash, prog, attach)
                except BaseException:
                    os.close(prog)
                    raise
                break
            except BpfError as exc:
                # SK_SKB_VERDICT needs 5.13+; older kernels take STREAM_VERDICT
                if attach != ATTACH_SK_SKB_VERDICT or exc.errno not in (errno.EINVAL,
                                                                       errno.EOPNOTSUPP):
                    raise
        fds.append(prog)
        return SockPairs(index, slots, sockhash, prog, capacity)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


OFFLOAD_MODES = ("auto", "off")


def try_load(mode: str) -> SockPairs | None:
    """``--tcp-offload``: ``off`` → None; ``auto`` → the loaded maps, or None (logged) when
    this kernel or these privileges do not allow them. Call before dropping privileges."""
    if mode == "off":
        log.info("tcp offload off: tcp_proxy relays in user space")
        return None
    try:
        pairs = load()
    except BpfError as exc:
        log.info("tcp offload unavailable (%s): tcp_proxy relays in user space", exc)
        if exc.log:
            log.debug("verifier log:\n%s", exc.log)
        return None
    except OSError as exc:
        log.info("tcp offload unavailable (%s): tcp_proxy relays in user space", exc)
        return None
    log.info("tcp offload on: plain IPv4 tcp_proxy connections relayed by a BPF sockmap")
    return pairs
