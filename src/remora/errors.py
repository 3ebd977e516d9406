"""The error tree of Remora.

Owns: the exception classes every package raises and the exit code each maps to.
Must not: print, log, or exit; the CLI does that.

Split by fault (bad input, the environment, a peer) so the CLI can choose an exit code and
a user can tell whose move it is. Third-party exceptions are converted at one boundary with
``raise ... from``.
"""

from __future__ import annotations


class RemoraError(Exception):
    """Root of every error Remora raises on purpose."""

    exit_code: int = 1


class BadInput(RemoraError):
    """The user gave a value we cannot use (a flag, an env var, a file)."""

    exit_code = 1


class EnvironmentFault(RemoraError):
    """The machine cannot do what was asked (not root, a binary missing, a kernel refusal)."""

    exit_code = 1


class ApplyFailed(EnvironmentFault):
    """The kernel or a tool refused a change; nothing was applied."""


class ValidationFailed(RemoraError):
    """`--run-validation` saw that traffic is not redirected (Istio exits 126)."""

    exit_code = 126
