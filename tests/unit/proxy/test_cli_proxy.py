"""`remora proxy` command line: usage errors exit 2, a bad bootstrap is one line and exit 1
(both before any socket is opened)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from remora import cli


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    """cli.main sets SIGPIPE to its default (die); in-process socket tests after this one
    must not inherit that."""
    before = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, before)


def test_proxy_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "proxy" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["-c"], ["-c", "b.yaml", "--concurrency", "0"],
                                  ["-c", "b.yaml", "--log-level", "loud"],
                                  ["-c", "b.yaml", "--drain-time-s", "-1"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["proxy", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: remora proxy") and err.count("\n") == 1, err


@pytest.mark.parametrize("text", ["static_resources: [", "admin: {bogus: 1}\n",
                                  "static_resources: {clusters: [{name: c, type: STATIC, "
                                  "lb_policy: LOAD_BALANCING_POLICY_CONFIG}]}\n",
                                  "static_resources: {clusters: [{name: c, type: STATIC, "
                                  "lb_policy: MAGLEV, maglev_lb_config: {table_size: 65536}}]}\n"])
def test_bad_bootstrap_is_one_line_exit_1(text: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    assert cli.main(["proxy", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1, err


def test_missing_bootstrap(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["proxy", "-c", "/nonexistent/bootstrap.yaml"]) == 1
    assert "cannot read bootstrap" in capsys.readouterr().err
