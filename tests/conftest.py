"""Suite-wide policy: privileged tests must not be skipped where they are required.

With ``REMORA_REQUIRE_PRIVILEGED=1`` (set by ``.ci/run``), a test marked ``privileged`` that
skips is reported as a failure, and a session in which no privileged test passed fails.

Compiled modules (:mod:`remora.native`): a session does not start when one is older than its
source (the tests would run the old code); with ``REMORA_REQUIRE_NATIVE=1`` (``.ci/run``) it
does not start unless every one is compiled.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from remora import native

REQUIRED = os.environ.get("REMORA_REQUIRE_PRIVILEGED") == "1"
REQUIRE_NATIVE = os.environ.get("REMORA_REQUIRE_NATIVE") == "1"
_passed_privileged = 0


def pytest_sessionstart(session: pytest.Session) -> None:
    st = native.status()
    if st.stale or (REQUIRE_NATIVE and st.missing):
        pytest.exit(f"{st.summary} (REMORA_REQUIRE_NATIVE=1)" if not st.stale else st.summary,
                    returncode=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    global _passed_privileged
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if item.get_closest_marker("privileged") is None:
        return
    if report.skipped and REQUIRED:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"privileged test skipped but REMORA_REQUIRE_PRIVILEGED=1: {reason}"
    elif report.when == "call" and report.passed:
        _passed_privileged += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRED and _passed_privileged == 0 and exitstatus == 0:
        print("\nREMORA_REQUIRE_PRIVILEGED=1 but no privileged test passed")
        session.exitstatus = 1


def require_root() -> None:
    """Skip (or, in CI, fail) a privileged test when not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
