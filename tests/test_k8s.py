"""deploy/k8s: both overlays render with `kubectl kustomize`, every object is valid against the Kubernetes
schemas (kubernetes-validate's bundled ones, offline), and the properties the deployment depends on hold:
probes, the headless Service, the NetworkPolicy, the admin key from a Secret, non-root pods, resources,
PodDisruptionBudgets, the drain grace, and the serving settings from one file."""

import re
import shutil
import socket
import subprocess
from dataclasses import fields
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from qwen3vl_triton.serve.launcher import settings_file_pairs, settings_from
from qwen3vl_triton.serve.repository import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SERVING_ENV = K8S / "base" / "serving.env"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.31.0"  # the schemas validated against (kubernetes-validate bundles 1.25 to 1.37)
ENCODER = {"app.kubernetes.io/name": "qwen3vl", "app.kubernetes.io/component": "encoder"}
LANGUAGE = {"app.kubernetes.io/name": "qwen3vl", "app.kubernetes.io/component": "language"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
SECRET = {"name": "qwen3vl-admin-key", "key": "admin-key"}
SETTINGS_PATH = "/etc/qwen3vl/serving.env"
DRAIN_MARGIN_S = 10  # at least this much of the grace period is left after the drain for the server's stop
# The language server's drain grace, which the grace periods are checked against; every key of serving.env
# is a launcher --set name, and this one is accepted here even where the Settings dataclass lacks it.
DRAIN_KEYS = {"drain_timeout_s"}


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not installed: the Kubernetes manifests cannot be rendered (install kubectl, "
                    "which carries kustomize: https://kubernetes.io/docs/tasks/tools/)")
    return exe


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict]) -> dict[str, dict]:
    """component -> its workload: the encoder Deployment and the language StatefulSet."""
    return {"encoder": one(objects, "Deployment", "qwen3vl-encoder"),
            "language": one(objects, "StatefulSet", "qwen3vl-language")}


def server(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["server"]
    return containers[0]


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a set of labels."""
    if not selector:
        return True  # {} selects everything
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if ((op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values)
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels)):
            return False
    return True


def serving_env() -> dict[str, str]:
    pairs = {}
    for line in SERVING_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


# -- rendering and schemas -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object(rendered, overlay):
    kinds = sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap"
                    else o["metadata"]["name"]) for o in rendered[overlay])
    assert kinds == sorted([
        ("Namespace", "qwen3vl"), ("ConfigMap", "qwen3vl-serving"), ("PersistentVolumeClaim", "qwen3vl-models"),
        *((kind, "qwen3vl-encoder") for kind in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                 "PodDisruptionBudget", "NetworkPolicy")),
        *((kind, "qwen3vl-language") for kind in ("StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy")),
    ])
    assert all(o["metadata"].get("namespace") == "qwen3vl" for o in rendered[overlay] if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas_offline(rendered, overlay, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("schema validation tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for obj in rendered[overlay]:
        # strict: a field the schema does not know (a typo) is an error, not ignored
        assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == "1.31", obj["metadata"]["name"]


def test_the_validator_refuses_what_kubernetes_would(rendered):
    """The schema check has teeth: a misspelt field and a wrong type are refused."""
    statefulset = one(rendered["cpu"], "StatefulSet")
    misspelt = yaml.safe_load(yaml.safe_dump(statefulset))
    server(misspelt)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(statefulset))
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_a_missing_kubectl_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="kubectl is not installed"):
        render("cpu")


# -- the servers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_triton_health_on_the_http_port(rendered, overlay):
    for component, workload in workloads(rendered[overlay]).items():
        container = server(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == PORTS, component
        args = container["args"]
        assert f"--http-port={PORTS['http']}" in args and f"--grpc-port={PORTS['grpc']}" in args
        assert f"--metrics-port={PORTS['metrics']}" in args and "--address=0.0.0.0" in args
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("startupProbe", "/v2/health/ready"),
                            ("livenessProbe", "/v2/health/live")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (component, probe)
            assert ports.get(get["port"], get["port"]) == PORTS["http"], (component, probe)
        # liveness starts only once the startup probe passed: a checkpoint loading for minutes is not killed
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
        assert "--timeout=1800" in args  # the launcher waits as long for the models


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_workload_runs_its_topology(rendered, overlay):
    for component, workload in workloads(rendered[overlay]).items():
        spec = workload["spec"]
        assert spec["selector"]["matchLabels"] == (ENCODER if component == "encoder" else LANGUAGE)
        assert selects(spec["selector"], spec["template"]["metadata"]["labels"])
        args = server(workload)["args"]
        assert server(workload)["command"] == ["qwen3vl-serve"]
        assert f"--topology={component}" in args
        assert f"--device={overlay}" in args
        assert ("--engine-dir=/engines/qwen3vl" in args) == (overlay == "gpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_language_servers_sit_behind_a_headless_service(rendered, overlay):
    objects = rendered[overlay]
    service = one(objects, "Service", "qwen3vl-language")
    statefulset = one(objects, "StatefulSet", "qwen3vl-language")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False  # a server that is not ready leaves DNS
    assert statefulset["spec"]["serviceName"] == "qwen3vl-language"
    assert service["spec"]["selector"] == LANGUAGE
    assert selects({"matchLabels": service["spec"]["selector"]}, statefulset["spec"]["template"]["metadata"]["labels"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == PORTS["grpc"]
    encoder_service = one(objects, "Service", "qwen3vl-encoder")
    assert encoder_service["spec"].get("clusterIP") != "None" and encoder_service["spec"]["selector"] == ENCODER


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_encoders_find_the_language_servers_through_the_headless_service_dns(rendered, overlay):
    encoder = server(workloads(rendered[overlay])["encoder"])
    urls = [a for a in encoder["args"] if a.startswith("--set=language_urls=")]
    assert urls == ["--set=language_urls=dns:qwen3vl-language.$(POD_NAMESPACE).svc.$(CLUSTER_DOMAIN):8001"]
    env = {e["name"]: e for e in encoder["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["CLUSTER_DOMAIN"]["value"] == "cluster.local"
    language = server(workloads(rendered[overlay])["language"])
    assert not any("language_url" in a for a in language["args"])  # language servers send to no one


# -- the network ------------------------------------------------------------------------------------------------
def admitted(policy: dict, labels: dict, namespace_labels: dict, port: int) -> bool:
    """Whether `policy` lets a pod with `labels` in a namespace with `namespace_labels` reach `port`."""
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(p["port"] == port for p in rule["ports"]):
            continue
        if "from" not in rule:
            return True  # no peers listed: every source
        for peer in rule["from"]:
            if "ipBlock" in peer:
                return True
            same_namespace = "namespaceSelector" not in peer
            ns_ok = (namespace_labels.get("kubernetes.io/metadata.name") == "qwen3vl" if same_namespace
                     else selects(peer["namespaceSelector"], namespace_labels))
            if ns_ok and selects(peer.get("podSelector", {}), labels):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_language_pods_are_reachable_on_grpc_only_from_encoder_pods(rendered, overlay):
    policies = [p for p in rendered[overlay] if p["kind"] == "NetworkPolicy"
                and selects(p["spec"]["podSelector"], LANGUAGE)]
    assert [p["metadata"]["name"] for p in policies] == ["qwen3vl-language"]
    policy = policies[0]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own = {"kubernetes.io/metadata.name": "qwen3vl"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert admitted(policy, ENCODER, own, PORTS["grpc"])
    assert not admitted(policy, ENCODER, own, PORTS["http"])
    assert not admitted(policy, LANGUAGE, own, PORTS["grpc"])  # not from each other
    assert not admitted(policy, {"app": "client"}, own, PORTS["grpc"])
    assert not admitted(policy, ENCODER, {"kubernetes.io/metadata.name": "other"}, PORTS["grpc"])
    # metrics: Prometheus only, from the namespace deploy/k8s/README.md names
    assert admitted(policy, PROMETHEUS, monitoring, PORTS["metrics"])
    assert not admitted(policy, PROMETHEUS, own, PORTS["metrics"])
    assert not admitted(policy, PROMETHEUS, monitoring, PORTS["grpc"])
    assert not admitted(policy, ENCODER, own, PORTS["metrics"])
    # the policy's own ports are the containers' ports
    container_ports = {p["containerPort"] for p in server(one(rendered[overlay], "StatefulSet"))["ports"]}
    assert {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]} <= container_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_encoder_metrics_are_reachable_only_from_prometheus(rendered, overlay):
    policy = one(rendered[overlay], "NetworkPolicy", "qwen3vl-encoder")
    assert selects(policy["spec"]["podSelector"], ENCODER) and not selects(policy["spec"]["podSelector"], LANGUAGE)
    anyone = ({"app": "client"}, {"kubernetes.io/metadata.name": "elsewhere"})
    assert admitted(policy, *anyone, PORTS["http"]) and admitted(policy, *anyone, PORTS["grpc"])
    assert not admitted(policy, *anyone, PORTS["metrics"])
    assert admitted(policy, PROMETHEUS, {"kubernetes.io/metadata.name": "monitoring"}, PORTS["metrics"])


# -- secrets and privileges ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_admin_key_comes_from_a_secret_and_never_from_the_manifests(rendered, overlay):
    objects = rendered[overlay]
    assert not [o for o in objects if o["kind"] == "Secret"]
    for component, workload in workloads(objects).items():
        container = server(workload)
        env = {e["name"]: e for e in container["env"]}
        key = env["QWEN3VL_ADMIN_KEY"]
        assert "value" not in key, component
        assert key["valueFrom"]["secretKeyRef"] == SECRET, component
        assert key["valueFrom"]["secretKeyRef"].get("optional") is not True  # no pod with a random key of its own
        assert not any("admin-key" in a or "admin_key" in a for a in container["command"] + container["args"])
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"admin-key\s*[=:]\s*[A-Za-z0-9_-]{16,}", text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_run_as_non_root_with_a_read_only_root(rendered, overlay):
    for component, workload in workloads(rendered[overlay]).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsGroup"] == 1000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        container = server(workload)
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, component
        assert security["readOnlyRootFilesystem"] is True, component
        assert security["capabilities"] == {"drop": ["ALL"]}, component
        assert security.get("runAsUser", 1000) != 0 and not security.get("privileged")
        # what the server writes goes to volumes: the build dir and HOME under /tmp, tensors in /dev/shm
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert "--build-dir=/tmp/qwen3vl" in container["args"]
        assert {e["name"]: e.get("value") for e in container["env"]}["HOME"].startswith("/tmp")
    namespace = one(rendered[overlay], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_checkpoint_comes_from_a_read_only_volume(rendered, overlay):
    claim = one(rendered[overlay], "PersistentVolumeClaim", "qwen3vl-models")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for component, workload in workloads(rendered[overlay]).items():
        pod = workload["spec"]["template"]["spec"]
        container = server(workload)
        volume = {v["name"]: v for v in pod["volumes"]}["models"]
        assert volume["persistentVolumeClaim"] == {"claimName": "qwen3vl-models", "readOnly": True}
        model_mounts = [m for m in container["volumeMounts"] if m["name"] == "models"]
        assert model_mounts and all(m["readOnly"] is True for m in model_mounts), component
        assert "--checkpoint=/models/checkpoint" in container["args"]
        assert {m["mountPath"]: m.get("subPath") for m in model_mounts}.get("/models", "?") is None


# -- resources and images ---------------------------------------------------------------------------------------------
def test_resources_gpu_overlay_asks_for_one_gpu_per_server_and_cpu_for_none(rendered):
    for overlay in OVERLAYS:
        for component, workload in workloads(rendered[overlay]).items():
            resources = server(workload)["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], (overlay, component)
            assert resources["limits"]["memory"], (overlay, component)
            gpus = [resources[k].get("nvidia.com/gpu") for k in ("requests", "limits")]
            assert gpus == ([1, 1] if overlay == "gpu" else [None, None]), (overlay, component)
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(rendered["cpu"])


def test_images_are_the_ones_docker_compose_builds(rendered):
    compose = yaml.safe_load(re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1",
                                    (ROOT / "docker-compose.yml").read_text()))["services"]
    expected = {"gpu": compose["triton"]["image"], "cpu": compose["triton-cpu"]["image"]}
    assert expected["gpu"] != expected["cpu"]
    assert compose["triton"]["build"]["args"]["BASE_IMAGE"].endswith("-trtllm-python-py3")  # the GPU stack's pin
    for overlay in OVERLAYS:
        for workload in workloads(rendered[overlay]).values():
            assert server(workload)["image"] == expected[overlay]


# -- availability and the drain ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_both_pools(rendered, overlay):
    objects = rendered[overlay]
    budgets = {b["metadata"]["name"]: b for b in objects if b["kind"] == "PodDisruptionBudget"}
    language = budgets["qwen3vl-language"]["spec"]
    assert selects(language["selector"], LANGUAGE) and not selects(language["selector"], ENCODER)
    assert language["maxUnavailable"] == 1  # one server drains at a time
    encoder = budgets["qwen3vl-encoder"]["spec"]
    assert selects(encoder["selector"], ENCODER) and not selects(encoder["selector"], LANGUAGE)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert 1 <= encoder["minAvailable"] < hpa["spec"]["minReplicas"]  # a budget that still allows an eviction
    replicas = one(objects, "StatefulSet")["spec"]["replicas"]
    assert replicas > language["maxUnavailable"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_encoder_pool_scales_on_triton_queue_time(rendered, overlay):
    hpa = one(rendered[overlay], "HorizontalPodAutoscaler", "qwen3vl-encoder")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "qwen3vl-encoder"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    readme = (K8S / "README.md").read_text()
    assert "avg_time_queue_us" in readme and "nv_inference_queue_duration_us" in readme  # the adapter rule
    assert hpa["spec"]["minReplicas"] <= one(rendered[overlay], "Deployment")["spec"]["replicas"] <= \
        hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(rendered, overlay):
    drain = int(serving_env()["drain_timeout_s"])
    assert drain > 0
    for component, workload in workloads(rendered[overlay]).items():
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain + DRAIN_MARGIN_S, (component, grace, drain)
    encoder = workloads(rendered[overlay])["encoder"]
    exit_timeout = int(next(a.split("=", 1)[1] for a in server(encoder)["args"] if a.startswith("--exit-timeout=")))
    pause = server(encoder)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert encoder["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause + exit_timeout


# -- one source for the serving settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_settings_config_map_is_serving_env_and_every_server_reads_it(rendered, overlay):
    maps = [o for o in rendered[overlay] if o["kind"] == "ConfigMap"]
    assert len(maps) == 1
    config_map = maps[0]
    assert re.fullmatch(r"qwen3vl-serving-[a-z0-9]{10}", config_map["metadata"]["name"])  # content hash: rolls pods
    assert config_map["data"] == {"serving.env": SERVING_ENV.read_text()}
    for component, workload in workloads(rendered[overlay]).items():
        pod = workload["spec"]["template"]["spec"]
        container = server(workload)
        volume = {v["name"]: v for v in pod["volumes"]}["settings"]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"], component
        mount = {m["name"]: m for m in container["volumeMounts"]}["settings"]
        assert f"{mount['mountPath']}/serving.env" == SETTINGS_PATH and mount["readOnly"] is True
        assert container["args"][0] == f"--settings-file={SETTINGS_PATH}"
        # no serving setting written a second time on a command line (language_urls is per workload)
        repeated = [a for a in container["args"] if a.startswith("--set=") and
                    a.split("=", 2)[1] in serving_env()]
        assert not repeated, (component, repeated)


def test_serving_env_holds_the_limits_and_only_launcher_settings(tmp_path):
    values = serving_env()
    for key in ("max_batch_size", "engine_max_batch", "max_seq_len", "max_output_len", "engine_max_queue",
                "max_queue_size", "drain_timeout_s"):
        assert key in values, key
    known = {f.name for f in fields(Settings)}
    assert set(values) - known <= DRAIN_KEYS, set(values) - known - DRAIN_KEYS
    # the file, as the launcher reads it (less the drain's own keys where the launcher has not got them)
    copy = tmp_path / "serving.env"
    copy.write_text("\n".join(line for line in SERVING_ENV.read_text().splitlines()
                              if line.partition("=")[0].strip() in known or "=" not in line or line.startswith("#")))
    settings = settings_from(settings_file_pairs(copy))
    for key, value in values.items():
        if key in known:
            assert str(getattr(settings, key)) == value, key
    assert settings.max_output_len < settings.max_seq_len
