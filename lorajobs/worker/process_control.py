"""Process-lifetime helpers shared by the supervisor, the zygote client and the zygote itself.

Torch-free and import-cheap: the zygote imports this before it preloads anything.
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent", "killpg", "pid_alive"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """The kernel SIGKILLs this process when the thread that forked it dies.

    Used as `preexec_fn` (between fork and exec) and in the zygote's forked children.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by whoever adopted it) is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    # "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ")"
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")
