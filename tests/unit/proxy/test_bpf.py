"""remora.proxy.bpf: instruction encodings (checked against llvm-mc's output for the same
assembly, recorded below), label layout, and — where the kernel allows it (root) — the
program passing the verifier and the sockmap relaying, counting, stopping at its limit, and
being usable after dropping privileges."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from remora.proxy import bpf, platform
from remora.proxy.bpf import R0, R1, R2, R3, R6, R10

# `llvm-mc -triple bpfel -show-encoding` for the assembly on the left.
LLVM_MC = [
    ("r6 = r1", bpf.mov64_reg(R6, R1), "bf16000000000000"),
    ("call 46", bpf.call(46), "850000002e000000"),
    ("*(u64 *)(r10 - 8) = r0", bpf.stx_mem(8, R10, R0, -8), "7b0af8ff00000000"),
    ("r2 += -8", bpf.add64_imm(R2, -8), "07020000f8ffffff"),
    ("r1 = *(u32 *)(r6 + 0)", bpf.ldx_mem(4, R1, R6, 0), "6161000000000000"),
    ("if r0 == 0 goto +9", bpf.jeq_imm(R0, 0, 9), "1500090000000000"),
    ("if r1 != 0 goto +3", bpf.jne_imm(R1, 0, 3), "5501030000000000"),
    ("if r2 > r3 goto +5", bpf.jgt_reg(R2, R3, 5), "2d32050000000000"),
    ("r2 += r1", bpf.add64_reg(R2, R1), "0f12000000000000"),
    ("r0 = 1", bpf.mov64_imm(R0, 1), "b700000001000000"),
    ("exit", bpf.exit_(), "9500000000000000"),
]


@pytest.mark.parametrize(("asm", "got", "want"), LLVM_MC, ids=[a for a, _, _ in LLVM_MC])
def test_encodings_match_llvm_mc(asm: str, got: bytes, want: str) -> None:
    assert got.hex() == want


def test_store_immediate_and_map_fd_load() -> None:
    # BPF_ST | BPF_MEM | BPF_DW, dst r0, off 24, imm 1 (llvm-mc has no syntax for it)
    assert bpf.st_imm(8, R0, 24, 1).hex() == "7a00180001000000"
    # `r1 = 5 ll` is 18010000 05000000 00000000 00000000; a map fd sets src = PSEUDO_MAP_FD
    assert bpf.ld_map_fd(R1, 5).hex() == "1811000005000000" + "00" * 8


def test_assemble_resolves_forward_labels_over_wide_instructions() -> None:
    code = bpf.assemble([
        (lambda o: bpf.jeq_imm(R0, 0, o), "end"),
        bpf.ld_map_fd(R1, 3),          # two slots
        bpf.mov64_imm(R0, 2),
        "end",
        bpf.exit_(),
    ])
    assert len(code) == 5 * 8
    assert struct.unpack_from("<h", code, 2)[0] == 3     # skips 3 slots


def test_verdict_program_jumps_land_inside_it() -> None:
    code = bpf.verdict_program(3, 4, 5)
    n = len(code) // 8
    for pc in range(n):
        op, = struct.unpack_from("<B", code, pc * 8)
        if op & 0x07 == bpf.JMP and op & 0xF0 not in (bpf.CALL, bpf.EXIT):
            off = struct.unpack_from("<h", code, pc * 8 + 2)[0]
            assert 0 < pc + 1 + off < n, pc
    assert code[-8:] == bpf.exit_()


# ------------------------------------------------------------------------------ kernel


@pytest.fixture
def pairs() -> Iterator[bpf.SockPairs]:
    try:
        p = bpf.load(capacity=4)
    except bpf.BpfError as exc:
        pytest.skip(f"cannot load BPF here: {exc}\n{exc.log}")
    yield p
    p.close()


def _two_hops() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """client → (a | b) → server on loopback: a and b are the proxy's two sockets."""
    ls = socket.create_server(("127.0.0.1", 0))
    us = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    b = socket.create_connection(us.getsockname())
    server, _ = us.accept()
    ls.close()
    us.close()
    for s in (client, a, b, server):
        s.settimeout(5)
    return client, a, b, server


def test_pair_relays_counts_and_reports_eof(pairs: bpf.SockPairs) -> None:
    client, a, b, server = _two_hops()
    base = platform.tcp_written(b)
    pair = pairs.pair(a, b, 1 << 20)
    assert pair is not None and pairs.active == 1
    client.sendall(b"hello")
    assert server.recv(100) == b"hello"
    server.sendall(b"world!")
    assert client.recv(100) == b"world!"
    assert (pair.bytes(0), pair.bytes(1)) == (5, 6)
    assert platform.tcp_written(b) - base == 5
    a.setblocking(False)
    with pytest.raises(BlockingIOError):
        a.recv(100)                          # nothing reaches user space
    client.shutdown(socket.SHUT_WR)
    a.setblocking(True)
    assert a.recv(100) == b""                # the FIN does
    pairs.release(pair)
    assert pairs.active == 0
    for s in (client, a, b, server):
        s.close()


def test_a_bare_fin_does_not_break_the_peer(pairs: bpf.SockPairs) -> None:
    """A FIN on its own is a zero-length skb: redirected, the kernel would set EPIPE on the
    peer; the program passes it instead, and the EOF still reaches user space."""
    client, a, b, server = _two_hops()
    pair = pairs.pair(a, b, 1 << 20)
    assert pair is not None
    client.sendall(b"x" * 100)
    assert server.recv(1000) == b"x" * 100
    client.shutdown(socket.SHUT_WR)
    assert a.recv(10) == b""
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    b.shutdown(socket.SHUT_WR)
    assert server.recv(10) == b""
    server.sendall(b"bye")
    assert client.recv(10) == b"bye"
    pairs.release(pair)
    for s in (client, a, b, server):
        s.close()


def test_bytes_queued_before_the_pairing_move_on_a_peek(pairs: bpf.SockPairs) -> None:
    """An skb already queued when the socket enters the map waits for the next one; a
    MSG_PEEK recv (platform.peek_nowait, as tcp.py does after pairing) runs it through."""
    client, a, b, server = _two_hops()
    client.sendall(b"early")
    # Wait for the segment to be queued on ``a`` (one send on loopback: one skb).
    assert select.select([a], [], [], 5)[0], "nothing arrived on a"
    assert platform.unread_bytes(a) == 5
    pair = pairs.pair(a, b, 1 << 20)
    assert pair is not None
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(10)                     # stuck in a's receive queue
    platform.peek_nowait(a.fileno())
    server.settimeout(5)
    assert server.recv(10) == b"early"
    assert pair.bytes(0) == 5
    pairs.release(pair)
    for s in (client, a, b, server):
        s.close()


def test_past_its_limit_a_direction_goes_to_user_space(pairs: bpf.SockPairs) -> None:
    client, a, b, server = _two_hops()
    pair = pairs.pair(a, b, 10)
    assert pair is not None
    client.sendall(b"0123456789")
    assert server.recv(100) == b"0123456789"
    assert not pair.stopped(0)
    client.sendall(b"x")
    assert a.recv(100) == b"x"               # over the limit: passed, not redirected
    assert pair.stopped(0) and pair.bytes(0) == 10
    pair.set_limit(0, 1000)                  # stopping is for good
    client.sendall(b"y")
    assert a.recv(100) == b"y"
    server.sendall(b"back")                  # the other direction is unaffected
    assert client.recv(100) == b"back"
    pairs.release(pair)
    for s in (client, a, b, server):
        s.close()


def test_an_unprivileged_process_can_pair_with_fds_it_holds(pairs: bpf.SockPairs) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    client, a, b, server = _two_hops()
    pid = os.fork()
    if pid == 0:   # pragma: no cover (child)
        code = 1
        try:
            os.setgroups([])
            os.setgid(1337)
            os.setuid(1337)
            pair = pairs.pair(a, b, 1 << 20)
            client.sendall(b"ping")
            code = 0 if pair is not None and server.recv(10) == b"ping" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for s in (client, a, b, server):
        s.close()


def test_try_load_off_and_failure_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bpf.try_load("off") is None

    def refuse(capacity: int = 0) -> bpf.SockPairs:
        raise bpf.BpfError(1, "map_create(remora_index)")
    monkeypatch.setattr(bpf, "load", refuse)
    assert bpf.try_load("auto") is None
