"""Process helpers shared by everything that starts a child: a free local port, and a child that dies with us."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator


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


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Silence this process's fd 2 while inside: importing torch, TRL or bitsandbytes prints a screenful of
    optional-kernel and deprecation lines that are not the user's business (a step keeps them in its own log)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
