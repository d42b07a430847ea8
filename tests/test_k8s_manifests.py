"""deploy/k8s: each overlay rendered, every object validated offline, and the deployment checked for sense.

Rendering uses tests/kustomize_lite.py, compared with a real kustomize where
one is installed. Validation uses kubernetes-validate's bundled schemas
(strict: unknown fields fail) for the oldest Kubernetes we support (1.30: the
native preStop sleep) and the newest it knows.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kustomize_lite import _named, render
from service_settings import parse_settings, service_of

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e .[dev] (kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
OLDEST_SUPPORTED = "1.30.0"
SERVICE_NAMES = {"loader": "llmexec.v1.LoaderService", "runner": "llmexec.v1.RunnerService",
                 "scheduler": "llmexec.v1.SchedulerService"}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(OVERLAYS / request.param)


def find(objects: list[dict], kind: str, name: str) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")}


def llmexec_containers(objects: list[dict]):
    for pod_name, pod in pod_specs(objects).items():
        for container in pod["containers"]:
            if container.get("command", [""])[-1].startswith("llmexec."):
                yield pod_name, pod, container


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_every_object_passes_the_kubernetes_schemas(overlay):
    _, objects = overlay
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for version in (OLDEST_SUPPORTED, kubernetes_validate.latest_version()):
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_a_misspelt_field():
    # The check above must be able to fail: a typo in a probe is caught.
    deployment = find(render(OVERLAYS / "cpu"), "Deployment", "llmexec-scheduler")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_SUPPORTED, strict=True)


def real_kustomize() -> tuple[list[str] | None, str]:
    """(command prefix, why not) for `kustomize build` or `kubectl kustomize` with kustomize >= 4."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"], ""
    if not shutil.which("kubectl"):
        return None, "no kustomize or kubectl on PATH"
    out = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True)
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "")
    major = re.match(r"v?(\d+)", version)
    if not major or int(major.group(1)) < 4:
        return None, f"kubectl's built-in kustomize is {version or 'unknown'}, too old for `patches:`"
    return ["kubectl", "kustomize"], ""


def canonical(value):
    """Lists of named objects compare as maps: kustomize orders merged lists its own way."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return {i["name"]: canonical(i) for i in value} if _named(value) else [canonical(i) for i in value]
    return value


def test_the_lite_renderer_agrees_with_real_kustomize(overlay):
    name, objects = overlay
    command, why_not = real_kustomize()
    if command is None:
        pytest.skip(f"rendered with tests/kustomize_lite.py only: {why_not}")
    out = subprocess.run([*command, str(OVERLAYS / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = lambda o: (o["kind"], o["metadata"]["name"])
    real = sorted((canonical(d) for d in yaml.safe_load_all(out.stdout) if d), key=key)
    assert sorted(map(canonical, objects), key=key) == real


def test_loader_and_runner_share_one_pod_and_a_memory_backed_dev_shm(overlay):
    _, objects = overlay
    engine = pod_specs(objects)["llmexec-engine"]
    assert [c["name"] for c in engine["containers"]] == ["loader", "runner"]
    [shm] = [v for v in engine["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    for container in engine["containers"]:
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # One scheduler per runner: never two of either, not even during an update.
    for name in ("llmexec-engine", "llmexec-scheduler"):
        deployment = find(objects, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_container_settings_parse_with_each_services_own_flags(overlay, monkeypatch):
    _, objects = overlay
    seen = set()
    for _, pod, container in llmexec_containers(objects):
        service = service_of(container["command"])
        seen.add(service)
        args = parse_settings(container["command"], literal_env(container), monkeypatch)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert args.port in ports.values() and args.host == "0.0.0.0"
        assert args.health_port in ports.values() and args.health_port != args.port
        assert args.drain_seconds > 0
        if service == "scheduler":  # Prometheus scrapes a fixed, declared port
            assert args.metrics_port in ports.values() and args.metrics_host == "0.0.0.0"
        # Every file the settings name is mounted from a Secret.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
        for path in (args.tls_cert, args.tls_key, args.tls_client_ca, args.tls_ca,
                     getattr(args, "api_token_file", ""), getattr(args, "redis_password_file", "")):
            if path:
                assert mounts.get(str(Path(path).parent)) in secret_volumes, (service, path)
        # Internal services require client certificates; the scheduler verifies the ones it calls.
        assert args.tls_cert and args.tls_key
        if service in ("loader", "runner"):
            assert args.tls_client_ca
        if service in ("runner", "scheduler"):
            assert args.tls_ca
        if service == "scheduler":
            assert args.api_token_file and args.redis_password_file
            assert args.redis_url.startswith("redis://llmexec-redis:")
            assert args.runner.startswith("llmexec-engine:") and args.loader.startswith("llmexec-engine:")
    assert seen == {"loader", "runner", "scheduler"}


def test_native_grpc_probes_on_the_health_port_with_per_service_names(overlay, monkeypatch):
    _, objects = overlay
    for _, _, container in llmexec_containers(objects):
        service = service_of(container["command"])
        args = parse_settings(container["command"], literal_env(container), monkeypatch)
        startup, ready, live = (container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe"))
        for probe in (startup, ready, live):
            assert probe["grpc"]["port"] == args.health_port  # plaintext: kubelet probes cannot do TLS
        assert startup["grpc"]["service"] == ready["grpc"]["service"] == SERVICE_NAMES[service]
        assert live["grpc"]["service"] == "liveness"  # never restarts a loading or draining service
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading needs minutes"


def test_graceful_shutdown_fits_in_the_grace_period(overlay, monkeypatch):
    _, objects = overlay
    for _, pod, container in llmexec_containers(objects):
        args = parse_settings(container["command"], literal_env(container), monkeypatch)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + args.drain_seconds + 5


def test_pods_run_unprivileged_with_read_only_root(overlay):
    _, objects = overlay
    for name, pod in pod_specs(objects).items():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        # Service links would put LLMEXEC_SCHEDULER_PORT=tcp://... into the environment.
        assert pod["enableServiceLinks"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]


def test_redis_keeps_an_append_only_file_and_takes_its_password_from_a_secret(overlay):
    _, objects = overlay
    redis = find(objects, "StatefulSet", "llmexec-redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "llmexec-redis", "key": "password"}
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_services_route_to_named_ports_of_the_pods_they_select(overlay):
    _, objects = overlay
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, service["metadata"]["name"]
        names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names


# --- NetworkPolicy: evaluate the policies for the paths we use and some we must not allow ---

def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def _rule_allows(rules: list[dict], peer_key: str, peer_labels: dict | None, port: int) -> bool:
    for rule in rules:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get(peer_key)
        if not peers:
            return True  # no `from`/`to`: any peer
        for peer in peers:
            if "podSelector" in peer and "namespaceSelector" not in peer and peer_labels is not None \
                    and _selects(peer["podSelector"], peer_labels):
                return True
    return False


def allowed(objects: list[dict], src: dict | None, dst: dict, port: int) -> bool:
    """Is TCP from pod labels `src` (None: outside the namespace) to pod labels `dst` on `port` allowed?"""
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]
    ingress = [p for p in policies if "Ingress" in p["policyTypes"] and _selects(p["podSelector"], dst)]
    if ingress and not any(_rule_allows(p.get("ingress", []), "from", src, port) for p in ingress):
        return False
    if src is None:
        return True
    egress = [p for p in policies if "Egress" in p["policyTypes"] and _selects(p["podSelector"], src)]
    return not egress or any(_rule_allows(p.get("egress", []), "to", dst, port) for p in egress)


def test_network_policies_allow_only_the_paths_the_services_use(overlay):
    _, objects = overlay
    labels = {name: o["spec"]["template"]["metadata"]["labels"] for name, o in
              ((o["metadata"]["name"], o) for o in objects if o["kind"] in ("Deployment", "StatefulSet"))}
    scheduler, engine, redis = labels["llmexec-scheduler"], labels["llmexec-engine"], labels["llmexec-redis"]
    client = None
    must = [(client, scheduler, 50051), (scheduler, engine, 50052), (scheduler, engine, 50053),
            (scheduler, redis, 6379), (client, scheduler, 50061), (client, engine, 50062), (client, engine, 50063),
            (client, scheduler, 9090)]
    must_not = [(client, engine, 50052), (client, engine, 50053), (client, redis, 6379), (engine, redis, 6379),
                (engine, scheduler, 50051), (redis, engine, 50053), (scheduler, engine, 6379)]
    for src, dst, port in must:
        assert allowed(objects, src, dst, port), (src, dst, port)
    for src, dst, port in must_not:
        assert not allowed(objects, src, dst, port), (src, dst, port)


def test_every_pod_has_a_disruption_budget(overlay):
    _, objects = overlay
    budgets = [o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"]
    for name, pod_labels in ((o["metadata"]["name"], o["spec"]["template"]["metadata"]["labels"])
                             for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        assert any(_selects(b["selector"], pod_labels) and b.get("minAvailable") == 1 for b in budgets), name


def test_only_the_gpu_overlay_asks_for_a_gpu_and_it_goes_to_the_runner(overlay):
    name, objects = overlay
    gpus = {(pod, c["name"]): c["resources"]["limits"].get("nvidia.com/gpu")
            for pod, spec in pod_specs(objects).items() for c in spec["containers"]}
    engine = pod_specs(objects)["llmexec-engine"]
    if name == "gpu":
        assert {k: v for k, v in gpus.items() if v} == {("llmexec-engine", "runner"): 1}
        assert engine["shareProcessNamespace"] is True
        assert {c["image"] for c in engine["containers"]} == {"llmexec:0.1.0-cuda"}
    else:
        assert not any(gpus.values())
        assert {c["image"] for c in engine["containers"]} == {"llmexec:0.1.0-cpu"}
