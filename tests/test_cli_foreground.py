"""`llmexec up` in the foreground: prints each service, serves, and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tiny_models import tiny_llama


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_foreground_up_then_ctrl_c_stops_every_service(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    env = {**os.environ, "LLMEXEC_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmexec", "up", "--model", str(folder), "--scheduler-port", "0",
         "--loader-port", "0", "--runner-port", "0", "--num-blocks", "64"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line or time.monotonic() > deadline:
                break
        output = "".join(lines)
        pids = {}
        for name in ("redis", "loader", "runner", "scheduler"):
            match = re.search(rf"^{name}\s+(\S+)\s+pid (\d+)\s+SERVING", output, re.MULTILINE)
            assert match, output
            pids[name] = int(match.group(2))
        assert all(pid_alive(pid) for pid in pids.values())
        status = subprocess.run([sys.executable, "-m", "llmexec", "status"], env=env, capture_output=True, text=True)
        assert status.stdout.count("SERVING") == 4, status.stdout
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output + rest
    assert "stopped" in rest
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids.values())
    assert not (tmp_path / "home" / "stack.json").exists()
