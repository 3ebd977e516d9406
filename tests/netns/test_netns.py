"""`remora.netns` itself: names, cleanup on failure, veth addressing, running code inside."""

from __future__ import annotations

import os
import socket

import pytest

from remora import netns
from remora.errors import EnvironmentFault
from tests.conftest import require_root

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

PREFIX = "rmr-u"


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def test_unique_names_differ_and_carry_pid() -> None:
    names = {netns.unique_name(PREFIX) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(f"{PREFIX}-{os.getpid()}-") for n in names)


def test_temporary_netns_is_removed_even_on_error() -> None:
    with pytest.raises(RuntimeError), netns.temporary_netns(PREFIX) as ns:
        assert ns.path.exists()
        name = ns.name
        raise RuntimeError("boom")
    assert not netns.netns_exists(name)


def test_pair_is_removed_when_setup_fails_halfway() -> None:
    before = set(os.listdir(netns.NETNS_DIR)) if netns.NETNS_DIR.exists() else set()
    with (
        pytest.raises(EnvironmentFault),
        netns.netns_pair(prefix=PREFIX, a_addresses=["10.1.0.1/24", "10.1.0.1/24"]),
    ):
        pass  # the duplicate address fails inside netns_pair
    after = set(os.listdir(netns.NETNS_DIR)) if netns.NETNS_DIR.exists() else set()
    assert after == before


def test_pair_addresses_routes_and_lo() -> None:
    host_links = socket.if_nameindex()
    with netns.netns_pair(
        prefix=PREFIX,
        a_addresses=["10.1.0.1/24", "fd00:1::1/64"],
        b_addresses=["10.1.0.2/24", "fd00:1::2/64"],
    ) as pair:
        a = pair.a.netns.run(["ip", "-o", "addr", "show"]).stdout
        assert "10.1.0.1/24" in a and "fd00:1::1/64" in a and "127.0.0.1/8" in a
        (ula,) = [line for line in a.splitlines() if "fd00:1::1/64" in line]
        assert "tentative" not in ula  # nodad: usable at once
        routes = pair.a.netns.run(["ip", "route"]).stdout
        assert "default via 10.1.0.2 dev eth0" in routes
        routes6 = pair.a.netns.run(["ip", "-6", "route"]).stdout
        assert "default via fd00:1::2 dev eth0" in routes6
        # both ends RUNNING when netns_pair returns, so IPv6 neighbour discovery works at once
        for end in (pair.a, pair.b):
            table = end.netns.run(["ip", "-6", "route", "show", "table", "all"]).stdout
            assert "multicast ff00::/8 dev eth0" in table, table
        # the veth was made inside the namespaces: the host namespace never saw it
        assert socket.if_nameindex() == host_links


def test_call_in_netns_sees_the_namespace_and_returns() -> None:
    with netns.temporary_netns(PREFIX) as ns:
        names = ns.call(lambda: sorted(n for _, n in socket.if_nameindex()))
        assert names == ["lo"]
        assert ns.call(os.getpid) != os.getpid()


def test_call_in_netns_reraises_and_times_out() -> None:
    def fail() -> None:
        raise ValueError("inside")

    with netns.temporary_netns(PREFIX) as ns:
        with pytest.raises(ValueError, match="inside"):
            ns.call(fail)
        r, w = os.pipe()
        try:
            with pytest.raises(TimeoutError):
                ns.call(lambda: os.read(r, 1), timeout=0.5)  # blocks: nobody writes
        finally:
            os.close(r)
            os.close(w)


def test_run_in_netns_reports_failures() -> None:
    with netns.temporary_netns(PREFIX) as ns:
        assert ns.run(["true"]).returncode == 0
        with pytest.raises(EnvironmentFault, match="exit 1"):
            ns.run(["false"])
        assert ns.run(["false"], check=False).returncode == 1


def test_remove_stale_removes_only_dead_owners() -> None:
    dead_pid = 2**22 + 12345  # above pid_max on common kernels: never alive
    dead = f"{PREFIX}-pod-{dead_pid}-0123abcd"
    live = netns.unique_name(f"{PREFIX}-pod")
    netns.create_netns(dead)
    netns.create_netns(live)
    try:
        removed = netns.remove_stale(PREFIX)
        assert dead in removed
        assert not netns.netns_exists(dead)
        assert netns.netns_exists(live)
    finally:
        netns.delete_netns(dead)
        netns.delete_netns(live)
