"""Find a Redis, or start a private ``redis-server`` on a free loopback port.

Used by ``smart-tuner up`` when nothing answers at the configured URL, and by the tests
that need a Redis they can stop and restart.

The server always requires a password (one is generated when none is given) and its URL
carries it, so whoever is handed ``url`` can connect and nobody else on the machine can.
The password goes to redis-server in a config file only its owner can read, not on the
command line, which every local user sees in ``ps``. With ``tls`` it listens for TLS only
and ``url`` is a ``rediss://`` one naming the CA to verify it with.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

PASSWORD_BYTES = 24  # secrets.token_urlsafe(24): 32 URL-safe characters
CONFIG_NAME = "redis.conf"
CONFIG_MODE = 0o600  # the password is in it
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis at ``url`` answers PING."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s,
                                         socket_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


def new_password() -> str:
    """A fresh URL-safe Redis password."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA that clients verify it with."""

    cert: Path
    key: Path
    ca: Path


class RedisProcess:
    """Start, stop and restart a throw-away Redis (nothing on disk) on a fixed port, with a
    password (``password``, or a generated one) and optionally TLS."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None,
                 tls: TlsFiles | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password or new_password()
        self.tls = tls
        auth = quote(self.password, safe="")
        if tls is None:
            self.url = f"redis://:{auth}@127.0.0.1:{self.port}/0"
        else:
            self.url = (f"rediss://:{auth}@127.0.0.1:{self.port}/0"
                        f"?ssl_ca_certs={quote(str(tls.ca), safe='/')}")
        self.process: subprocess.Popen | None = None

    def _config(self) -> Path:
        """The config file: everything but the port lives here, the password above all."""
        lines = [f"requirepass {self.password}", "bind 127.0.0.1", 'save ""',
                 "appendonly no", f'dir "{self.workdir}"']
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            lines += ["port 0", f"tls-port {self.port}", f'tls-cert-file "{self.tls.cert}"',
                      f'tls-key-file "{self.tls.key}"', f'tls-ca-cert-file "{self.tls.ca}"',
                      "tls-auth-clients no"]  # the password authenticates clients
        path = self.workdir / CONFIG_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CONFIG_MODE)
        with os.fdopen(fd, "w") as config:
            config.write("\n".join(lines) + "\n")
        return path

    def start(self) -> RedisProcess:
        """Start and wait until it answers PING."""
        self.process = subprocess.Popen([self.binary, str(self._config())],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Kill it (its data goes with it: --save '' keeps nothing)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
