"""The Helm chart (helm/loraplane), rendered offline with Helm's own Go engine.

helm-python-sdk (import name helm_python) binds Helm's Go SDK, so rendering,
`helm lint` and the values.schema.json check here are Helm's, with no helm
binary and no cluster. Every rendered object is validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail);
CRDs it has no schema for (ServiceMonitor) are skipped by kind and their shape
asserted instead.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[2] / "helm" / "loraplane"
RELEASE, NAMESPACE = "lp", "serving"
# The chart's kubeVersion floor (native gRPC probes are GA in 1.27) and the newest
# schemas the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor"}
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
USER_LABELS = {"team": "ml-platform", "cost-center": "42"}

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis-url": {
        "redis": {"enabled": False},
        "externalRedis": {"url": "rediss://:s3cret@redis.example.com:6380/0"},
    },
    "external-redis-secret": {
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": "corp-redis", "existingSecretKey": "url"},
    },
    "sentinel": {
        "redis": {"enabled": False},
        "externalRedis": {"sentinel": {"enabled": True, "masterName": "lp", "db": 2, "password": "pw",
                                       "hosts": ["s-0.sentinel:26379", "s-1.sentinel:26379"]}},
    },
    "four-gpus": {
        "dataPlane": {
            "replicas": 4,
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
            "maxModelLen": 8192,
            "maxNumBatchedTokens": 1024,
            "enablePrefixCaching": False,
        },
    },
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "no-pvc": {"controlPlane": {"replicas": 1, "artifacts": {"persistence": {"enabled": False}}}},
    "hpa": {
        "controlPlane": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "dataPlane": {"autoscaling": {"enabled": True, "maxReplicas": 8, "metrics": [{
            "type": "Pods",
            "pods": {"metric": {"name": "loraplane_requests_waiting"},
                     "target": {"type": "AverageValue", "averageValue": "4"}},
        }]}},
    },
    "user-labels": {
        # A user label that collides with a chart key must not win anywhere.
        "commonLabels": {**USER_LABELS, "app.kubernetes.io/component": "hijack"},
        "controlPlane": {"podLabels": {"sidecar.istio.io/inject": "false"}},
        "dataPlane": {"podLabels": {"gpu-pool": "a"}},
        "redis": {"podLabels": {"backup": "nightly"}},
    },
    "hub-download-and-secrets": {
        "hf": {"token": "hf_abc", "endpoint": "https://hub.internal"},
        "s3": {"endpointUrl": "https://s3.internal", "existingSecret": "s3-keys"},
        "auth": {"existingSecret": "corp-tokens"},
        "dataPlane": {"model": {"source": "download"}},
        "model": {"revision": "v1.0"},
        "controlPlane": {"allowedRoots": ["/adapters"], "extraVolumes": [
            {"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters"}}],
            "extraVolumeMounts": [{"name": "adapters", "mountPath": "/adapters", "readOnly": True}]},
    },
    "hostpath-mig-digest": {
        "dataPlane": {"model": {"source": "hostPath", "hostPath": "/mnt/weights", "dir": "qwen"},
                      "gpu": {"resourceName": "nvidia.com/mig-3g.40gb"},
                      "image": {"digest": "sha256:" + "a" * 64}},
        "redis": {"auth": {"enabled": False}, "persistence": {"enabled": False}},
    },
    "tls": {"tls": {"enabled": True, "secretName": "loraplane-tls"}},
    "mtls": {"tls": {"enabled": True, "secretName": "loraplane-tls", "clientAuth": True, "healthPort": 8087}},
}
# TLS scenarios and whether they require client certificates (mTLS).
TLS_SCENARIOS = {"tls": False, "mtls": True}
TLS_DIR = "/etc/loraplane/tls"
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca", "--health-listen", "--control-plane-ca",
             "--control-plane-client-cert", "--control-plane-client-key")


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict[str, Any]]]:
    return {name: render(chart, values) for name, values in SCENARIOS.items()}


def find(docs, kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (
        component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]


def one(docs, kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def pod_spec(workload) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload, name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == name)


def flags(c) -> dict[str, list[str]]:
    """--name=value args of a container, by name."""
    out: dict[str, list[str]] = {}
    for a in c.get("args", []):
        if a.startswith("--") and "=" in a:
            k, _, v = a.partition("=")
            out.setdefault(k, []).append(v)
    return out


def all_containers(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            spec = pod_spec(d)
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


# --- Helm's own checks -----------------------------------------------------------

def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["name"] == "loraplane" and meta["apiVersion"] == "v2"
    assert meta["appVersion"] == "0.1.0"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict_is_clean(scenario):
    for version in K8S_VERSIONS:
        report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (version, problems, report["errors"])


def test_default_values_satisfy_the_schema(chart):
    chart.validate_schema(chart.values)
    assert chart.schema["additionalProperties"] is False


# --- Kubernetes schemas ---------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_validates_strictly(rendered, scenario):
    docs = rendered[scenario]
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        if doc["kind"] in CRD_KINDS:
            continue  # no OpenAPI schema for CRDs; test_service_monitor checks its shape
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {e.message} at {list(e.path)}")


def test_default_objects(rendered):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered["default"])
    assert kinds == sorted([
        ("Deployment", "lp-loraplane-control-plane"),
        ("Deployment", "lp-loraplane-data-plane"),
        ("NetworkPolicy", "lp-loraplane-redis"),
        ("PersistentVolumeClaim", "lp-loraplane-control-plane-artifacts"),
        ("PodDisruptionBudget", "lp-loraplane-control-plane"),
        ("PodDisruptionBudget", "lp-loraplane-data-plane"),
        ("Secret", "lp-loraplane-auth"),
        ("Secret", "lp-loraplane-redis"),
        ("Service", "lp-loraplane-control-plane"),
        ("Service", "lp-loraplane-data-plane"),
        ("Service", "lp-loraplane-redis"),
        ("ServiceAccount", "lp-loraplane"),
        ("StatefulSet", "lp-loraplane-redis"),
    ])


# --- labels and selectors -------------------------------------------------------

def selectors(doc) -> list[dict[str, str]]:
    """Every label selector in an object, wherever the chart puts one."""
    spec = doc.get("spec", {})
    found = []
    if doc["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget", "ServiceMonitor"):
        found.append(spec["selector"]["matchLabels"])
    if doc["kind"] == "Service":
        found.append(spec["selector"])
    if doc["kind"] == "NetworkPolicy":
        found.append(spec["podSelector"]["matchLabels"])
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                for expr in peer.get("podSelector", {}).get("matchExpressions", []):
                    found.append({expr["key"]: ",".join(expr["values"])})
    if doc["kind"] in ("Deployment", "StatefulSet"):
        for term in pod_spec(doc).get("affinity", {}).get("podAntiAffinity", {}).get(
                "preferredDuringSchedulingIgnoredDuringExecution", []):
            found.append(term["podAffinityTerm"]["labelSelector"]["matchLabels"])
        for vct in spec.get("volumeClaimTemplates", []):
            found.append(vct["metadata"].get("labels", {}))
    return found


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_selectors_hold_only_chart_keys(rendered, scenario):
    for doc in rendered[scenario]:
        for sel in selectors(doc):
            assert sel and set(sel) <= SELECTOR_KEYS, (doc["kind"], doc["metadata"]["name"], sel)
            assert sel.get("app.kubernetes.io/instance", RELEASE) == RELEASE
            assert sel.get("app.kubernetes.io/component") != "hijack"


def test_user_labels_reach_objects_but_never_selectors(rendered):
    docs = rendered["user-labels"]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert USER_LABELS.items() <= labels.items(), doc["metadata"]["name"]
        owner = re.search(r"(control-plane|data-plane|redis)", doc["metadata"]["name"])
        if owner:
            assert labels["app.kubernetes.io/component"] == owner.group(1), doc["metadata"]["name"]
    pod_labels = {"control-plane": ("sidecar.istio.io/inject", "false"), "data-plane": ("gpu-pool", "a"),
                  "redis": ("backup", "nightly")}
    for component, (key, value) in pod_labels.items():
        wl = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              and d["metadata"]["labels"]["app.kubernetes.io/component"] == component][0]
        tmpl = wl["spec"]["template"]["metadata"]["labels"]
        assert tmpl[key] == value and tmpl["app.kubernetes.io/component"] == component
        assert key not in wl["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_selectors_match_their_pods(rendered, scenario):
    docs = rendered[scenario]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for wl in workloads:
        sel = wl["spec"]["selector"]["matchLabels"]
        assert sel.items() <= wl["spec"]["template"]["metadata"]["labels"].items()
    # Services, PDBs and NetworkPolicy pick exactly one workload's pods.
    for doc in docs:
        if doc["kind"] in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
            sel = selectors(doc)[0]
            matched = [w for w in workloads if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            assert len(matched) == 1, (doc["kind"], doc["metadata"]["name"])


# --- images -----------------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_images_are_pinned(rendered, scenario):
    for c in all_containers(rendered[scenario]):
        image = c["image"]
        assert not image.endswith(":latest") and ":latest@" not in image, image
        assert re.search(r"(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$", image.rsplit("/", 1)[-1]), image


def test_default_images_follow_app_version(rendered):
    docs = rendered["default"]
    assert container(one(docs, "Deployment", "control-plane"), "control-plane")["image"] == \
        "ghcr.io/loraplane/control-plane:0.1.0"
    assert container(one(docs, "Deployment", "data-plane"), "data-plane")["image"] == \
        "ghcr.io/loraplane/data-plane:0.1.0"
    digest = container(one(rendered["hostpath-mig-digest"], "Deployment", "data-plane"), "data-plane")["image"]
    assert digest == "ghcr.io/loraplane/data-plane@sha256:" + "a" * 64


# --- probes and shutdown ----------------------------------------------------------

@pytest.mark.parametrize("component,port", [("control-plane", 50051), ("data-plane", 50052)])
def test_grpc_probes_use_their_own_health_service(rendered, component, port):
    c = container(one(rendered["default"], "Deployment", component), component)
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port
    for probe, service in (("startupProbe", "startup"), ("readinessProbe", "readiness"),
                           ("livenessProbe", "liveness")):
        assert c[probe]["grpc"] == {"port": port, "service": service}
        assert not {"exec", "httpGet", "tcpSocket"} & set(c[probe])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_termination_grace_exceeds_server_grace_period(rendered, scenario):
    for component in ("control-plane", "data-plane"):
        wl = one(rendered[scenario], "Deployment", component)
        grace = float(flags(container(wl, component))["--grace-period"][0])
        assert pod_spec(wl)["terminationGracePeriodSeconds"] > grace


# --- GPUs, replicas, autoscaling --------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_one_gpu_per_data_plane_replica(rendered, scenario):
    docs = rendered[scenario]
    gpu = SCENARIOS[scenario].get("dataPlane", {}).get("gpu", {}).get("resourceName", "nvidia.com/gpu")
    res = container(one(docs, "Deployment", "data-plane"), "data-plane")["resources"]
    assert res["requests"][gpu] == 1 and res["limits"][gpu] == 1
    cp = container(one(docs, "Deployment", "control-plane"), "control-plane")["resources"]
    assert not any("gpu" in k for k in {**cp.get("requests", {}), **cp.get("limits", {})})


def test_gpu_scheduling_values(rendered):
    default = pod_spec(one(rendered["default"], "Deployment", "data-plane"))
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in default["tolerations"]
    four = pod_spec(one(rendered["four-gpus"], "Deployment", "data-plane"))
    assert four["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert four["tolerations"][0]["key"] == "gpu"
    shm = next(v for v in four["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_replica_counts(rendered):
    assert one(rendered["default"], "Deployment", "control-plane")["spec"]["replicas"] == 2
    assert one(rendered["default"], "Deployment", "data-plane")["spec"]["replicas"] == 1
    assert one(rendered["four-gpus"], "Deployment", "data-plane")["spec"]["replicas"] == 4
    assert one(rendered["no-pvc"], "Deployment", "control-plane")["spec"]["replicas"] == 1
    assert one(rendered["default"], "StatefulSet", "redis")["spec"]["replicas"] == 1


def test_hpa_owns_replicas_when_enabled(rendered):
    docs = rendered["hpa"]
    assert not find(rendered["default"], "HorizontalPodAutoscaler")
    for component in ("control-plane", "data-plane"):
        wl = one(docs, "Deployment", component)
        assert "replicas" not in wl["spec"], "a fixed replica count would fight the HPA on every upgrade"
        hpa = one(docs, "HorizontalPodAutoscaler", component)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": wl["metadata"]["name"]}
    dp = one(docs, "HorizontalPodAutoscaler", "data-plane")["spec"]
    assert dp["maxReplicas"] == 8 and dp["metrics"][0]["type"] == "Pods"
    assert dp["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    cp = one(docs, "HorizontalPodAutoscaler", "control-plane")["spec"]
    assert cp["metrics"][0]["resource"]["name"] == "cpu" and cp["minReplicas"] == 2


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pdbs_present(rendered, scenario):
    for component in ("control-plane", "data-plane"):
        pdb = one(rendered[scenario], "PodDisruptionBudget", component)
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_pdb_min_available_wins(chart):
    docs = render(chart, {"controlPlane": {"pdb": {"minAvailable": "50%"}}})
    assert one(docs, "PodDisruptionBudget", "control-plane")["spec"] == {
        "minAvailable": "50%", "selector": {"matchLabels": {
            "app.kubernetes.io/name": "loraplane", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "control-plane"}}}


# --- services and monitoring ------------------------------------------------------

def test_services(rendered):
    docs = rendered["default"]
    cp = one(docs, "Service", "control-plane")["spec"]
    assert cp["type"] == "ClusterIP" and "clusterIP" not in cp
    assert cp["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
                            "appProtocol": "grpc"}]
    dp = one(docs, "Service", "data-plane")["spec"]
    assert dp["clusterIP"] == "None", "client-side balancing needs one DNS record per replica"
    assert {p["name"]: p["port"] for p in dp["ports"]} == {"grpc": 50052, "metrics": 9090}


def test_service_monitor(rendered):
    assert not find(rendered["default"], "ServiceMonitor")
    docs = rendered["service-monitor"]
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "scheme": "http",
                                        "interval": "30s", "scrapeTimeout": "10s"}]
    # It must select the Service that carries the metrics port, and only that one.
    services = [s for s in find(docs, "Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["lp-loraplane-data-plane"]
    assert "metrics" in {p["name"] for p in services[0]["spec"]["ports"]}


# --- secrets ------------------------------------------------------------------------

def referenced_secrets(docs) -> set[str]:
    names = set()
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = pod_spec(d)
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
    return names


EXISTING_SECRETS = {"corp-redis", "s3-keys", "corp-tokens", "loraplane-tls"}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_referenced_secret_exists_or_is_user_provided(rendered, scenario):
    docs = rendered[scenario]
    rendered_secrets = {s["metadata"]["name"]: s for s in find(docs, "Secret")}
    for name in referenced_secrets(docs):
        assert name in rendered_secrets or name in EXISTING_SECRETS, name
    for d in docs:
        for c in all_containers([d]) if d["kind"] in ("Deployment", "StatefulSet") else []:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in rendered_secrets:
                    assert ref["key"] in rendered_secrets[ref["name"]]["data"], (ref, d["metadata"]["name"])


def secret_data(docs, name) -> dict[str, str]:
    s = next(d for d in find(docs, "Secret") if d["metadata"]["name"] == name)
    return {k: base64.b64decode(v).decode() for k, v in s["data"].items()}


@pytest.mark.parametrize("component", ["control-plane", "data-plane"])
def test_tokens_are_mounted_files(rendered, component):
    docs = rendered["default"]
    wl = one(docs, "Deployment", component)
    f = flags(container(wl, component))
    assert f["--admin-token-file"] == ["/etc/loraplane/auth/admin-token"]
    assert f["--distribution-token-file"] == ["/etc/loraplane/auth/distribution-token"]
    auth = next(v for v in pod_spec(wl)["volumes"] if v["name"] == "auth")["secret"]
    assert auth["secretName"] == "lp-loraplane-auth"
    assert {i["path"] for i in auth["items"]} == {"admin-token", "distribution-token"}
    mount = next(m for m in container(wl, component)["volumeMounts"] if m["name"] == "auth")
    assert mount == {"name": "auth", "mountPath": "/etc/loraplane/auth", "readOnly": True}
    env_names = {e["name"] for e in container(wl, component)["env"]}
    assert not {"LORAPLANE_ADMIN_TOKEN", "LORAPLANE_DISTRIBUTION_TOKEN"} & env_names


def test_generated_tokens_are_random_and_given_ones_are_kept(chart, rendered):
    a = secret_data(rendered["default"], "lp-loraplane-auth")
    b = secret_data(render(chart, {}), "lp-loraplane-auth")
    assert set(a) == {"admin-token", "distribution-token"}
    assert all(len(v) == 48 and v.isalnum() for v in a.values())
    assert a["admin-token"] != a["distribution-token"] and a != b
    given = secret_data(render(chart, {"auth": {"adminToken": "adm", "distributionToken": "dist"}}),
                        "lp-loraplane-auth")
    assert given == {"admin-token": "adm", "distribution-token": "dist"}
    # Upgrades keep the generated values: the template asks the cluster first.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert re.search(r'lookup "v1" "Secret" \.ctx\.Release\.Namespace \.name', helpers)


def test_existing_auth_secret_is_used_not_rendered(rendered):
    docs = rendered["hub-download-and-secrets"]
    assert "lp-loraplane-auth" not in {s["metadata"]["name"] for s in find(docs, "Secret")}
    for component in ("control-plane", "data-plane"):
        vol = next(v for v in pod_spec(one(docs, "Deployment", component))["volumes"] if v["name"] == "auth")
        assert vol["secret"]["secretName"] == "corp-tokens"


def env(c) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_hf_and_s3_credentials(rendered):
    assert "HF_TOKEN" not in env(container(one(rendered["default"], "Deployment", "control-plane"),
                                           "control-plane"))
    docs = rendered["hub-download-and-secrets"]
    assert secret_data(docs, "lp-loraplane-hf") == {"token": "hf_abc"}
    cp = container(one(docs, "Deployment", "control-plane"), "control-plane")
    e = env(cp)
    assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "lp-loraplane-hf", "key": "token"}}
    assert e["HF_ENDPOINT"] == "https://hub.internal"
    assert e["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
    assert e["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"] == {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}
    f = flags(cp)
    assert f["--hf-endpoint"] == ["https://hub.internal"] and f["--s3-endpoint-url"] == ["https://s3.internal"]
    assert f["--allowed-root"] == ["/adapters"]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in cp["volumeMounts"]


# --- Redis --------------------------------------------------------------------------

def test_in_cluster_redis_is_persistent_with_aof(rendered):
    docs = rendered["default"]
    sts = one(docs, "StatefulSet", "redis")
    args = container(sts, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    vct = sts["spec"]["volumeClaimTemplates"]
    assert [v["metadata"]["name"] for v in vct] == ["data"]
    assert vct[0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert sts["spec"]["serviceName"] == one(docs, "Service", "redis")["metadata"]["name"]
    assert one(docs, "Service", "redis")["spec"]["clusterIP"] == "None"
    data = secret_data(docs, "lp-loraplane-redis")
    assert re.fullmatch(r"[A-Za-z0-9]{48}", data["redis-password"])
    assert data["redis-url"] == f"redis://:{data['redis-password']}@lp-loraplane-redis.{NAMESPACE}.svc:6379/0"


def test_a_new_redis_password_restarts_redis_and_survives_the_url(chart):
    def redis_checksum(docs):
        return one(docs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["annotations"]["checksum/auth"]

    old = render(chart, {"redis": {"auth": {"password": "old"}}})
    new = render(chart, {"redis": {"auth": {"password": "p w+x/y@z#"}}})
    # Redis restarts with the new --requirepass as the planes roll onto the URL that carries it.
    assert redis_checksum(old) != redis_checksum(new)
    assert redis_checksum(render(chart, {"redis": {"auth": {"password": "old"}}})) == redis_checksum(old)
    from redis.connection import parse_url

    url = secret_data(new, "lp-loraplane-redis")["redis-url"]
    assert parse_url(url)["password"] == "p w+x/y@z#", url  # a space is %20, not "+"


def test_disk_cache_bytes_zero_disables_the_tier(chart):
    docs = render(chart, {"dataPlane": {"diskCache": {"bytes": 0}}})
    dp = one(docs, "Deployment", "data-plane")
    assert "--disk-cache-bytes=0" in container(dp, "data-plane")["args"]
    assert volume(dp, "adapter-cache") == {"name": "adapter-cache", "emptyDir": {}}


def test_redis_without_auth_or_persistence(rendered):
    docs = rendered["hostpath-mig-digest"]
    sts = one(docs, "StatefulSet", "redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(sts)["volumes"]
    assert "--requirepass" not in container(sts, "redis")["args"]
    assert secret_data(docs, "lp-loraplane-redis") == {"redis-url": f"redis://lp-loraplane-redis.{NAMESPACE}.svc:6379/0"}


def redis_url_refs(docs) -> list[dict[str, str]]:
    out = []
    for component in ("control-plane", "data-plane"):
        c = container(one(docs, "Deployment", component), component)
        out.append(env(c)["LORAPLANE_REDIS_URL"]["secretKeyRef"])
    return out


@pytest.mark.parametrize("scenario,secret,key,url", [
    ("external-redis-url", "lp-loraplane-redis", "redis-url", "rediss://:s3cret@redis.example.com:6380/0"),
    ("external-redis-secret", "corp-redis", "url", None),
    ("sentinel", "lp-loraplane-redis", "redis-url", "redis+sentinel://:pw@s-0.sentinel:26379,s-1.sentinel:26379/lp/2"),
])
def test_external_redis(rendered, scenario, secret, key, url):
    docs = rendered[scenario]
    assert not find(docs, "StatefulSet") and not find(docs, "NetworkPolicy")
    assert redis_url_refs(docs) == [{"name": secret, "key": key}] * 2
    if url:
        assert secret_data(docs, secret) == {"redis-url": url}
    else:
        assert not find(docs, "Secret", None) or secret not in {s["metadata"]["name"] for s in find(docs, "Secret")}


def test_redis_url_never_in_args(rendered):
    # Both servers read LORAPLANE_REDIS_URL; in args its password would show in `ps` and /proc.
    for scenario, docs in rendered.items():
        for component in ("control-plane", "data-plane"):
            c = container(one(docs, "Deployment", component), component)
            assert not any("redis-url" in a or "redis://" in a for a in c["args"]), (scenario, component)


# --- storage ------------------------------------------------------------------------

def volume(wl, name):
    return next(v for v in pod_spec(wl)["volumes"] if v["name"] == name)


def test_artifact_store(rendered):
    docs = rendered["default"]
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    cp = one(docs, "Deployment", "control-plane")
    assert volume(cp, "artifacts") == {"name": "artifacts",
                                       "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
    f = flags(container(cp, "control-plane"))
    assert f["--artifact-dir"] == ["/var/lib/loraplane/artifacts"]
    assert {"name": "artifacts", "mountPath": "/var/lib/loraplane/artifacts"} in \
        container(cp, "control-plane")["volumeMounts"]
    no_pvc = rendered["no-pvc"]
    assert not find(no_pvc, "PersistentVolumeClaim")
    assert volume(one(no_pvc, "Deployment", "control-plane"), "artifacts") == {"name": "artifacts", "emptyDir": {}}


def test_model_volume_sources(rendered):
    dp = one(rendered["default"], "Deployment", "data-plane")
    assert volume(dp, "model")["persistentVolumeClaim"] == {"claimName": "loraplane-models", "readOnly": True}
    assert flags(container(dp, "data-plane"))["--model"] == ["/models/Qwen/Qwen2.5-7B-Instruct"]
    assert "initContainers" not in pod_spec(dp)

    host = one(rendered["hostpath-mig-digest"], "Deployment", "data-plane")
    assert volume(host, "model")["hostPath"] == {"path": "/mnt/weights", "type": "Directory"}
    assert flags(container(host, "data-plane"))["--model"] == ["/models/qwen"]

    dl = one(rendered["hub-download-and-secrets"], "Deployment", "data-plane")
    assert "emptyDir" in volume(dl, "model")
    init = pod_spec(dl)["initContainers"][0]
    assert init["image"] == container(dl, "data-plane")["image"]
    assert init["command"][:2] == ["python", "-c"]
    assert init["command"][3:6] == ["Qwen/Qwen2.5-7B-Instruct", "v1.0", "/models/Qwen/Qwen2.5-7B-Instruct"]
    compile(init["command"][2], "download-model", "exec")
    assert env(init)["HF_TOKEN"] == {"secretKeyRef": {"name": "lp-loraplane-hf", "key": "token"}}
    # The main container only reads what the init container wrote.
    assert next(m for m in container(dl, "data-plane")["volumeMounts"] if m["name"] == "model")["readOnly"]
    # The control plane validates adapters against the config.json of the revision the data planes serve.
    cp = flags(container(one(rendered["hub-download-and-secrets"], "Deployment", "control-plane"), "control-plane"))
    assert (cp["--base-model"], cp["--base-model-revision"]) == (["Qwen/Qwen2.5-7B-Instruct"], ["v1.0"])
    assert "--base-model-revision" not in flags(container(one(rendered["default"], "Deployment", "control-plane"),
                                                          "control-plane"))


def test_a_local_base_model_gets_no_hub_revision(chart):
    docs = render(chart, {"model": {"revision": "v1.0"}, "controlPlane": {"baseModel": "/weights/qwen"}})
    cp = flags(container(one(docs, "Deployment", "control-plane"), "control-plane"))
    assert cp["--base-model"] == ["/weights/qwen"] and "--base-model-revision" not in cp


def test_disk_cache_volume_has_headroom(rendered):
    dp = one(rendered["default"], "Deployment", "data-plane")
    cache_bytes = int(flags(container(dp, "data-plane"))["--disk-cache-bytes"][0])
    assert cache_bytes == 20 * 2**30
    assert int(volume(dp, "adapter-cache")["emptyDir"]["sizeLimit"]) == cache_bytes * 5 // 4


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_hardened_pods(rendered, scenario):
    for d in rendered[scenario]:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = pod_spec(d)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


# --- the args the chart passes are the ones the servers take -----------------------

def _parser():
    cli = pytest.importorskip("loraplane.cli")
    return cli.build_parser()


def test_control_plane_args_parse_with_the_real_cli(rendered):
    parser = _parser()
    for scenario, docs in rendered.items():
        c = container(one(docs, "Deployment", "control-plane"), "control-plane")
        args = parser.parse_args(c["args"])
        assert args.command == "control-plane", scenario
        assert args.listen == "0.0.0.0:50051" and args.redis_prefix == "loraplane"
        assert args.max_lora_rank == 64 and args.max_adapter_bytes == 2 << 30
        assert str(args.artifact_dir) == "/var/lib/loraplane/artifacts"


def test_data_plane_args_parse_with_the_real_cli(rendered):
    parser = _parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # noqa: SLF001
    if "data-plane" not in sub.choices:
        pytest.skip("the data-plane subcommand is not in loraplane.cli yet")
    for scenario, docs in rendered.items():
        c = container(one(docs, "Deployment", "data-plane"), "data-plane")
        args = parser.parse_args(c["args"])
        assert args.command == "data-plane", scenario
        assert args.listen == "0.0.0.0:50052" and args.metrics_port == 9090
        assert args.control_plane == "lp-loraplane-control-plane:50051"
        assert args.max_lora_rank == 64 and args.disk_cache_bytes == 20 << 30
        assert str(args.disk_cache_dir) == "/var/lib/loraplane/adapter-cache"
        assert args.enable_prefix_caching is (scenario != "four-gpus"), scenario


def test_data_plane_flags(rendered):
    c = container(one(rendered["four-gpus"], "Deployment", "data-plane"), "data-plane")
    assert c["args"][:2] == ["--log-level=INFO", "data-plane"], "the global flag goes before the subcommand"
    f = flags(c)
    assert f["--listen"] == ["0.0.0.0:50052"] and f["--metrics-port"] == ["9090"]
    assert f["--control-plane"] == ["lp-loraplane-control-plane:50051"]
    assert f["--replica-id"] == ["$(POD_NAME)"] and f["--advertise-address"] == ["$(POD_IP):50052"]
    assert f["--max-model-len"] == ["8192"] and f["--max-lora-rank"] == ["64"]
    assert f["--max-num-batched-tokens"] == ["1024"] and "--no-enable-prefix-caching" in c["args"]
    default = container(one(rendered["default"], "Deployment", "data-plane"), "data-plane")
    assert not {"--max-model-len", "--max-num-batched-tokens"} & set(flags(default))
    assert "--no-enable-prefix-caching" not in default["args"]
    e = env(c)
    assert e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # $(VAR) expands only from variables defined earlier in the container's env.
    assert "LORAPLANE_REDIS_URL" in e
    assert all(isinstance(a, str) for a in c["args"])


# --- TLS -----------------------------------------------------------------------------

def _parse(component: str, c) -> Any:
    parser = _parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # noqa: SLF001
    if component not in sub.choices:
        pytest.skip(f"the {component} subcommand is not in loraplane.cli yet")
    return parser.parse_args(c["args"])


@pytest.mark.parametrize("component", ["control-plane", "data-plane"])
@pytest.mark.parametrize("scenario", sorted(TLS_SCENARIOS))
def test_tls_args_parse_with_the_real_cli(rendered, scenario, component):
    client_auth = TLS_SCENARIOS[scenario]
    health = SCENARIOS[scenario]["tls"].get("healthPort", 8086)
    args = _parse(component, container(one(rendered[scenario], "Deployment", component), component))
    assert args.tls_cert == Path(TLS_DIR, "tls.crt") and args.tls_key == Path(TLS_DIR, "tls.key")
    assert args.tls_client_ca == (Path(TLS_DIR, "ca.crt") if client_auth else None)
    assert args.health_listen == f"0.0.0.0:{health}"
    assert args.listen.endswith(":50051" if component == "control-plane" else ":50052")
    tls = {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca,
           "health_listen": args.health_listen}
    if component == "control-plane":
        config = pytest.importorskip("control_plane.config")
        config.ControlPlaneConfig(base_model=args.base_model, listen=args.listen, **tls)  # the servers' own checks
        return
    # The data plane dials the control plane over TLS, verifying it with the release's CA.
    assert args.control_plane == "lp-loraplane-control-plane:50051"
    assert args.control_plane_ca == Path(TLS_DIR, "ca.crt")
    pair = (Path(TLS_DIR, "tls.crt"), Path(TLS_DIR, "tls.key")) if client_auth else (None, None)
    assert (args.control_plane_client_cert, args.control_plane_client_key) == pair
    config = pytest.importorskip("data_plane.server.config")
    config.DataPlaneConfig(model=args.model, control_plane=args.control_plane, listen=args.listen, device="cpu",
                           control_plane_ca=args.control_plane_ca,
                           control_plane_client_cert=args.control_plane_client_cert,
                           control_plane_client_key=args.control_plane_client_key, **tls)


@pytest.mark.parametrize("component,port", [("control-plane", 50051), ("data-plane", 50052)])
@pytest.mark.parametrize("scenario", sorted(TLS_SCENARIOS))
def test_tls_probes_use_the_plaintext_health_port(rendered, scenario, component, port):
    # The kubelet's gRPC probes cannot speak TLS: every probe goes to --health-listen.
    health = SCENARIOS[scenario]["tls"].get("healthPort", 8086)
    c = container(one(rendered[scenario], "Deployment", component), component)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == port and ports["health"] == health
    assert flags(c)["--health-listen"] == [f"0.0.0.0:{health}"]
    for probe, service in (("startupProbe", "startup"), ("readinessProbe", "readiness"),
                           ("livenessProbe", "liveness")):
        assert c[probe]["grpc"] == {"port": health, "service": service}
    # Only the kubelet needs it: the Service keeps to the TLS port.
    svc_ports = {p["name"] for p in one(rendered[scenario], "Service", component)["spec"]["ports"]}
    assert "health" not in svc_ports and "grpc" in svc_ports


@pytest.mark.parametrize("component", ["control-plane", "data-plane"])
@pytest.mark.parametrize("scenario", sorted(TLS_SCENARIOS))
def test_tls_secret_is_mounted_read_only(rendered, scenario, component):
    wl = one(rendered[scenario], "Deployment", component)
    assert volume(wl, "tls") == {"name": "tls", "secret": {
        "secretName": "loraplane-tls", "defaultMode": 0o440,
        "items": [{"key": k, "path": k} for k in ("tls.crt", "tls.key", "ca.crt")]}}
    c = container(wl, component)
    # A directory mount, not subPath: a renewed certificate reaches the files.
    assert next(m for m in c["volumeMounts"] if m["name"] == "tls") == {
        "name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    # Mode 0440 files are readable through the group: the kubelet gives them fsGroup.
    sc = pod_spec(wl)["securityContext"]
    assert sc["fsGroup"] == sc["runAsGroup"] == 10001
    # Every file a TLS flag names is one the volume provides.
    provided = {f"{TLS_DIR}/{k}" for k in ("tls.crt", "tls.key", "ca.crt")}
    named = [v for k, vs in flags(c).items() if k in TLS_FLAGS and k != "--health-listen" for v in vs]
    assert named and set(named) <= provided


@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - set(TLS_SCENARIOS)))
def test_no_tls_unless_enabled(rendered, scenario):
    for component in ("control-plane", "data-plane"):
        wl = one(rendered[scenario], "Deployment", component)
        c = container(wl, component)
        assert not [a for a in c["args"] if a.split("=", 1)[0] in TLS_FLAGS], (scenario, component)
        assert "health" not in {p["name"] for p in c["ports"]}
        assert {c[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == \
            {{p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]}
        assert "tls" not in {v["name"] for v in pod_spec(wl)["volumes"]}
        assert "tls" not in {m["name"] for m in c["volumeMounts"]}


def test_tls_settings_are_inert_while_disabled(chart):
    # Everything but tls.enabled changes nothing, NOTES included: turning TLS off restores today's manifests.
    fixed = {"auth": {"adminToken": "a", "distributionToken": "d"}, "redis": {"auth": {"password": "p"}}}
    default = chart.render(fixed, name=RELEASE, namespace=NAMESPACE)
    assert chart.render({**fixed, "tls": {"secretName": "loraplane-tls", "healthPort": 9443}},
                        name=RELEASE, namespace=NAMESPACE) == default


@pytest.mark.parametrize("scenario", ["default", *sorted(TLS_SCENARIOS)])
def test_notes_commands_are_tls_aware(chart, scenario):
    notes = chart.render(SCENARIOS[scenario], name=RELEASE, namespace=NAMESPACE)["loraplane/templates/NOTES.txt"]
    commands = [shlex.split(line) for line in notes.splitlines() if line.strip().startswith("loraplane adapters")]
    assert commands
    parser = _parser()
    for argv in commands:
        args = parser.parse_args(argv[1:])  # the real CLI takes the flags where NOTES puts them
        assert args.command == "adapters"
        if scenario == "default":
            assert args.ca_cert is None and args.client_cert is None
            continue
        assert args.ca_cert == Path("ca.crt")
        client = (Path("client.crt"), Path("client.key")) if TLS_SCENARIOS[scenario] else (None, None)
        assert (args.client_cert, args.client_key) == client
    if scenario == "default":
        assert "TLS" not in notes
        return
    assert "get secret loraplane-tls -o jsonpath='{.data.ca\\.crt}'" in notes
    assert "export LORAPLANE_ADDRESS=localhost:50051" in notes
    for name in ("lp-loraplane-control-plane,", "lp-loraplane-data-plane.serving.svc", "localhost"):
        assert name in notes
    assert ("clientAuth" in notes) == TLS_SCENARIOS[scenario]


# --- values the schema or the templates refuse ----------------------------------

@pytest.mark.parametrize("values,where", [
    ({"controlPlane": {"replicas": -1}}, "/controlPlane/replicas"),
    ({"dataPlane": {"replicas": -1}}, "/dataPlane/replicas"),
    ({"controlPlane": {"image": {"tag": "latest"}}}, "/controlPlane/image/tag"),
    ({"dataPlane": {"image": {"tag": "latest"}}}, "/dataPlane/image/tag"),
    ({"redis": {"image": {"tag": "latest"}}}, "/redis/image/tag"),
    ({"dataPlane": {"image": {"digest": "sha256:short"}}}, "/dataPlane/image/digest"),
    ({"controlPlane": {"port": 70000}}, "/controlPlane/port"),
    ({"dataPlane": {"model": {"source": "s3"}}}, "/dataPlane/model/source"),
    ({"dataPlane": {"model": {"existingClaim": ""}}}, "/dataPlane/model"),
    ({"dataPlane": {"dtype": "int4"}}, "/dataPlane/dtype"),
    ({"controlPlane": {"probes": {"readiness": {"exec": {"command": ["true"]}}}}}, "/controlPlane/probes/readiness"),
    ({"controlPlane": {"artifacts": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}},
     "/controlPlane/artifacts/persistence/accessModes"),
    ({"lora": {"maxRank": 0}}, "/lora/maxRank"),
    ({"redisPrefix": "a b"}, "/redisPrefix"),
    ({"commonLabels": {"n": 1}}, "/commonLabels/n"),
    ({"controlPlan": {}}, "controlPlan"),
    ({"tls": {"enabled": "yes"}}, "/tls/enabled"),
    ({"tls": {"secretName": "Not_A_Name"}}, "/tls/secretName"),
    ({"tls": {"healthPort": 0}}, "/tls/healthPort"),
    ({"tls": {"clientCa": "ca.crt"}}, "clientCa"),
    ({"dataPlane": {"maxLoras": 0}}, "/dataPlane/maxLoras"),         # the data plane refuses 0 at start
    ({"dataPlane": {"maxCpuLoras": 0}}, "/dataPlane/maxCpuLoras"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(err.value)


@pytest.mark.parametrize("values,message", [
    ({"controlPlane": {"artifacts": {"persistence": {"enabled": False}}}}, "replicas=1"),
    ({"controlPlane": {"replicas": 1, "autoscaling": {"enabled": True},
                       "artifacts": {"persistence": {"enabled": False}}}}, "replicas=1"),
    ({"controlPlane": {"artifacts": {"persistence": {"accessModes": ["ReadWriteOnce"]}}}}, "ReadWriteMany"),
    ({"externalRedis": {"url": "redis://elsewhere:6379/0"}}, "redis.enabled=false"),
    ({"redis": {"enabled": False}}, "exactly one of externalRedis"),
    ({"redis": {"enabled": False}, "externalRedis": {"url": "redis://a:6379/0", "existingSecret": "s"}},
     "exactly one of externalRedis"),
    ({"redis": {"enabled": False}, "externalRedis": {"sentinel": {"enabled": True}}}, "sentinel.hosts"),
    ({"dataPlane": {"gracePeriodSeconds": 30, "terminationGracePeriodSeconds": 30}}, "must exceed"),
    ({"controlPlane": {"image": {"tag": "LATEST"}}}, None),
    ({"tls": {"enabled": True}}, "tls.enabled=true needs tls.secretName"),
    ({"tls": {"clientAuth": True}}, "tls.clientAuth=true (mTLS) needs tls.enabled=true"),
    ({"tls": {"enabled": True, "secretName": "t", "healthPort": 50051}}, "must differ from controlPlane.port"),
    ({"tls": {"enabled": True, "secretName": "t", "healthPort": 50052}}, "must differ from dataPlane.port"),
    ({"tls": {"enabled": True, "secretName": "t", "healthPort": 9090}}, "must differ from dataPlane.metricsPort"),
    ({"dataPlane": {"maxLoras": 8, "maxCpuLoras": 4}}, "must be >= dataPlane.maxLoras"),
])
def test_inconsistent_values_fail_the_render(chart, values, message):
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    if message:
        assert message in str(err.value)


def test_rwo_existing_claim_is_the_operators_call(chart):
    # An existing claim's access modes are unknown to the chart, so it does not second-guess them.
    docs = render(chart, {"controlPlane": {"artifacts": {"persistence": {
        "existingClaim": "artifacts", "accessModes": ["ReadWriteOnce"]}}}})
    assert not find(docs, "PersistentVolumeClaim")
    assert volume(one(docs, "Deployment", "control-plane"), "artifacts")["persistentVolumeClaim"] == {
        "claimName": "artifacts"}


def test_schema_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)


def test_notes_render(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["loraplane/templates/NOTES.txt"]
    assert "lp-loraplane-control-plane.serving.svc:50051" in notes
    assert "WARNING" not in notes
    no_pvc = chart.render(SCENARIOS["no-pvc"], name=RELEASE, namespace=NAMESPACE)["loraplane/templates/NOTES.txt"]
    assert "emptyDir" in no_pvc


def test_secret_changes_roll_the_pods(chart, rendered):
    def checksums(docs):
        return {c: one(docs, "Deployment", c)["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
                for c in ("control-plane", "data-plane")}
    default = checksums(rendered["default"])
    assert checksums(render(chart, {})) == default, "same values, same hash, despite generated tokens"
    for changed in (checksums(rendered["external-redis-url"]), checksums(render(chart, {"auth": {"adminToken": "new"}}))):
        assert all(changed[c] != default[c] for c in default)
    annotated = render(chart, {"dataPlane": {"podAnnotations": {"a": "b"}}})
    assert one(annotated, "Deployment", "data-plane")["spec"]["template"]["metadata"]["annotations"]["a"] == "b"


@pytest.mark.parametrize("release,values,prefix", [
    ("lp", {"fullnameOverride": "serving"}, "serving"),
    ("loraplane-prod", {}, "loraplane-prod"),
    ("lp", {"nameOverride": "lora"}, "lp-lora"),
])
def test_names(chart, release, values, prefix):
    docs = [d for d in (yaml.safe_load(t) for p, t in chart.render(values, name=release, namespace=NAMESPACE).items()
                        if p.endswith("deployment.yaml")) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == [f"{prefix}-control-plane", f"{prefix}-data-plane"]
    for d in docs:
        assert d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == release
