"""Process helpers shared by everything that starts a child: a free local port, and a child that dies with us."""
from __future__ import annotations

import os
import signal
import socket
import sys


def free_port() -> int:
    """A TCP port nobody listens on now: two servers or multi-process runs on one machine must not share a
    fixed port (torchrun's default 29500: the second would fail, or join the first's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the launching command dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def new_session_dying_with_parent() -> None:
    """die_with_parent in a session of its own, so that stopping the child's group stops all it started."""
    os.setsid()
    die_with_parent()
