"""What the deployment files must say: the rendered Kustomize overlays (dev, prod), the compose
file and the Dockerfile.

Run by deploy/check.sh, which renders the overlays into $LDT_RENDERED_DIR. Without it, the
overlays are rendered here with $LDT_KUSTOMIZE (default `kubectl kustomize`).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1]
ROOT = DEPLOY.parent
sys.path.insert(0, str(DEPLOY / "tools"))
import validate  # noqa: E402  (deploy/tools/validate.py)

SERVICES = ["order", "orchestrator", "payment", "inventory", "delivery", "dead-letter"]
OVERLAYS = ["dev", "prod"]
IMAGES = {"dev": "ldt:dev", "prod": "ghcr.io/late-day-tokens/ldt:0.1.0"}
# Secrets that the prod overlay expects to exist already (created outside kustomize).
EXTERNAL_SECRETS = {"dev": set(), "prod": {"ldt-credentials", "ldt-admin"}}
# Public path -> the service that owns it (what the IngressRoute must do).
PUBLIC_PATHS = {
    "/api/purchase": "order",
    "/api/purchase/": "order",
    "/api/all-transaction": "order",
    "/api/v1/orders": "order",
    "/api/v1/orders/0190a8f0-0000-7000-8000-000000000000": "order",
    "/docs": "order",
    "/docs/": "order",
    "/docs/swagger-ui.css": "order",
    "/openapi.json": "order",
    "/api/v1/sagas/0190a8f0-0000-7000-8000-000000000000": "orchestrator",
    "/api/v1/users/alice": "payment",
    "/api/v1/inventory": "inventory",
    "/api/v1/inventory/restock": "inventory",
    "/api/v1/deliveries": "delivery",
    "/api/v1/dead-letters": "dead-letter",
    "/api/v1/dead-letters/42/replay": "dead-letter",
}
CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
SECRET_NAME = re.compile(r"pass(word)?|secret|token|credential", re.I)


# ---------------------------------------------------------------------------- loading


def _render(overlay: str) -> str:
    rendered = os.environ.get("LDT_RENDERED_DIR")
    if rendered:
        return (Path(rendered) / f"{overlay}.yaml").read_text()
    cmd = shlex.split(os.environ.get("LDT_KUSTOMIZE", "kubectl kustomize"))
    try:
        return subprocess.run(cmd + [str(DEPLOY / "k8s" / "overlays" / overlay)], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"cannot render {overlay} with {cmd}: {e}; run deploy/check.sh")


_CACHE: dict[str, list[dict]] = {}


def docs(overlay: str) -> list[dict]:
    if overlay not in _CACHE:
        _CACHE[overlay] = [d for d in yaml.safe_load_all(_render(overlay)) if d]
    return _CACHE[overlay]


def objects(overlay: str, kind: str) -> list[dict]:
    return [d for d in docs(overlay) if d["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [d for d in objects(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def generated(overlay: str, kind: str, base_name: str) -> dict:
    """A ConfigMap/Secret made by a generator: `name` or `name-<hash>`."""
    pat = re.compile(rf"^{re.escape(base_name)}(-[a-z0-9]{{10}})?$")
    found = [d for d in objects(overlay, kind) if pat.match(d["metadata"]["name"])]
    assert len(found) == 1, f"{overlay}: expected one {kind} {base_name}, found {len(found)}"
    return found[0]


def deployment(overlay: str, service: str) -> dict:
    return one(overlay, "Deployment", f"ldt-{service}")


def container(dep: dict) -> dict:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per ldt pod"
    return containers[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def config_of(overlay: str, c: dict) -> dict[str, str]:
    """The ConfigMap data a container gets through envFrom."""
    data: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src["configMapRef"]["name"]
        data.update(one(overlay, "ConfigMap", ref).get("data", {}))
    return data


def effective_env(overlay: str, c: dict) -> dict[str, object]:
    """name -> literal value or ('secret', name, key) / ('configmap', ...) reference."""
    result: dict[str, object] = dict(config_of(overlay, c))
    for name, e in env_of(c).items():
        if "value" in e:
            result[name] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            result[name] = ("secret", ref["name"], ref["key"])
        else:
            result[name] = ("ref", e.get("valueFrom"))
    return result


def pod_workloads(overlay: str) -> list[dict]:
    return [d for d in docs(overlay) if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


PARAMS = [(o, s) for o in OVERLAYS for s in SERVICES]


# ---------------------------------------------------------------------------- every service


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_deployment_runs_the_one_image_as_that_service(overlay, service):
    c = container(deployment(overlay, service))
    assert c["args"] == ["serve", service]
    assert "command" not in c, "the image's ENTRYPOINT is ldt"
    assert c["image"] == IMAGES[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_all_ldt_containers_share_one_image(overlay):
    images = {container(deployment(overlay, s))["image"] for s in SERVICES}
    assert images == {IMAGES[overlay]}


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_probes(overlay, service):
    c = container(deployment(overlay, service))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports.get("http") == 8080
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                        ("startupProbe", "/healthz")]:
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", 8080), probe
    # The startup probe must outlast the broker/database retry at start.
    startup = c["startupProbe"]
    startup_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    timeout_s = int(config_of(overlay, c).get("LDT_STARTUP_TIMEOUT_S", "30"))
    assert startup_s > timeout_s


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_resources_have_requests_and_limits(overlay, service):
    res = container(deployment(overlay, service))["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part]), part


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_graceful_drain_fits_the_grace_period(overlay, service):
    spec = deployment(overlay, service)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_security_context(overlay, service):
    pod = deployment(overlay, service)["spec"]["template"]["spec"]
    c = container(deployment(overlay, service))
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})

    def eff(key):
        return csc.get(key, psc.get(key))

    assert eff("runAsNonRoot") is True
    assert eff("runAsUser") == 10001
    assert csc.get("readOnlyRootFilesystem") is True
    assert csc.get("allowPrivilegeEscalation") is False
    assert "ALL" in csc.get("capabilities", {}).get("drop", [])
    assert (eff("seccompProfile") or {}).get("type") == "RuntimeDefault"
    assert not csc.get("privileged", False)
    # /tmp is writable (an emptyDir); nothing else is.
    tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    vol = {v["name"]: v for v in pod["volumes"]}[tmp[0]["name"]]
    assert "emptyDir" in vol
    assert pod.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_settings_and_secrets(overlay, service):
    c = container(deployment(overlay, service))
    env = effective_env(overlay, c)
    assert env["LDT_HTTP_ADDR"] == "0.0.0.0:8080"
    assert env["LDT_LOG_FORMAT"] == "json"
    assert env["LDT_QUEUE_TYPE"] == "quorum"
    # The deadline the cluster test proves on a replicated broker.
    assert env["LDT_STEP_TIMEOUT_MS"] == ("2000" if overlay == "prod" else "500")
    assert env["OTEL_SERVICE_NAME"] == f"ldt-{service}"
    for var, key in [("LDT_AMQP_URL", "amqp-url"), ("LDT_DATABASE_URL", "database-url")]:
        kind, secret, k = env[var]
        assert kind == "secret" and k == key, var
        assert secret == "ldt-credentials" or secret.startswith("ldt-credentials-"), var
    kind, secret, _ = env["LDT_ADMIN_TOKEN"]
    assert kind == "secret" and (secret == "ldt-admin" or secret.startswith("ldt-admin-"))
    # Every LDT_* setting the binary reads is spelled right (a typo would be silently ignored).
    known = {"LDT_HTTP_ADDR", "LDT_AMQP_URL", "LDT_DATABASE_URL", "LDT_NAMESPACE",
             "LDT_INITIAL_CREDITS", "LDT_INITIAL_STOCK", "LDT_STEP_TIMEOUT_MS", "LDT_STALL_MS",
             "LDT_PREFETCH", "LDT_DB_POOL_SIZE", "LDT_STARTUP_TIMEOUT_S", "LDT_LOG_FORMAT",
             "LDT_QUEUE_TYPE", "LDT_FAULT_INJECTION", "LDT_ADMIN_TOKEN", "LDT_BUNDLE_MAX"}
    # A service's own database server (LDT_DATABASE_URL_<SERVICE>): only its own, from the
    # credentials, optional (without the key, the shared server).
    own = f"LDT_DATABASE_URL_{service.upper().replace('-', '_')}"
    if own in env:
        kind, secret, k = env[own]
        assert kind == "secret" and k == f"{service}-database-url"
        assert secret == "ldt-credentials" or secret.startswith("ldt-credentials-")
        assert env_of(c)[own]["valueFrom"]["secretKeyRef"].get("optional") is True
        known = known | {own}
    assert {k for k in env if k.startswith("LDT_")} <= known
    # Test-only knobs (crash points, duplicate injection, expiring queues) stay out of clusters.
    assert not {"LDT_CRASH_POINT", "LDT_CHAOS_DUPLICATE_EVERY", "LDT_QUEUE_EXPIRES_MS"} & set(env)
    assert env["LDT_FAULT_INJECTION"] in ("true", "false"), "the binary defaults it to true"
    assert re.fullmatch(r"[a-z][a-z0-9_]{0,39}", env["LDT_NAMESPACE"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_literal_credentials_anywhere(overlay):
    """Passwords and URLs with credentials come from Secrets, never from literal values."""
    for w in pod_workloads(overlay):
        pod = w["spec"]["template"]["spec"]
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                where = f"{w['kind']}/{w['metadata']['name']} {c['name']} {e['name']}"
                if "value" in e:
                    assert not CREDENTIAL_URL.search(str(e["value"])), where
                    assert not SECRET_NAME.search(e["name"]), f"{where}: use a secretKeyRef"
            assert not any(CREDENTIAL_URL.search(a) for a in c.get("args", []) + c.get("command", []))
    for cm in objects(overlay, "ConfigMap"):
        for k, v in cm.get("data", {}).items():
            assert not CREDENTIAL_URL.search(v), f"ConfigMap {cm['metadata']['name']} {k}"
            assert not SECRET_NAME.search(k), f"ConfigMap {cm['metadata']['name']} {k}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves(overlay):
    """configMapRef / secretKeyRef / volumes name an object of the render (generated names
    included) or, in prod, a Secret created outside kustomize."""
    names = {(d["kind"], d["metadata"]["name"]) for d in docs(overlay)}
    for w in pod_workloads(overlay):
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            for src in c.get("envFrom", []):
                assert ("ConfigMap", src["configMapRef"]["name"]) in names
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ("Secret", ref["name"]) in names or ref["name"] in EXTERNAL_SECRETS[overlay], (
                        f"{w['metadata']['name']}: Secret {ref['name']}")
                    if ("Secret", ref["name"]) in names:
                        secret = one(overlay, "Secret", ref["name"])
                        assert ref["key"] in secret.get("data", {}) | secret.get("stringData", {})
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names


@pytest.mark.parametrize("overlay,service", PARAMS)
def test_service_port_80_to_8080(overlay, service):
    svc = one(overlay, "Service", f"ldt-{service}")
    dep = deployment(overlay, service)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": svc["spec"]["selector"]}, labels)
    # ... and no other service's pods.
    for other in SERVICES:
        if other != service:
            other_labels = deployment(overlay, other)["spec"]["template"]["metadata"]["labels"]
            assert not selects({"matchLabels": svc["spec"]["selector"]}, other_labels)
    assert selects(dep["spec"]["selector"], labels)
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 80
    c = container(dep)
    target = port["targetPort"]
    assert target == 8080 or {p["name"]: p["containerPort"] for p in c["ports"]}[target] == 8080


# ---------------------------------------------------------------------------- ingress


def route_matchers(match: str) -> list[tuple[str, str]]:
    """`Path(`/a`) || PathPrefix(`/b`)` -> [("Path", "/a"), ("PathPrefix", "/b")]. Only that
    grammar: anything else fails here, so this test is kept in step with the routes."""
    parts = [p.strip() for p in match.split("||")]
    result = []
    for p in parts:
        m = re.fullmatch(r"(Path|PathPrefix)\(`([^`]+)`\)", p)
        assert m, f"unsupported matcher {p!r} in {match!r}"
        result.append((m.group(1), m.group(2)))
    return result


def routed_to(ingress: dict, path: str) -> list[str]:
    hits = []
    for route in ingress["spec"]["routes"]:
        for kind, value in route_matchers(route["match"]):
            if (kind == "Path" and path == value) or (kind == "PathPrefix" and path.startswith(value)):
                hits.extend(s["name"] for s in route["services"])
                break
    return hits


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("path,owner", sorted(PUBLIC_PATHS.items()))
def test_ingressroute_routes_each_public_path_to_its_owner(overlay, path, owner):
    (ingress,) = objects(overlay, "IngressRoute")
    assert routed_to(ingress, path) == [f"ldt-{owner}"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingressroute_targets_exist(overlay):
    (ingress,) = objects(overlay, "IngressRoute")
    assert routed_to(ingress, "/api/v1/unknown") == []
    assert routed_to(ingress, "/healthz") == []
    for route in ingress["spec"]["routes"]:
        assert route["kind"] == "Rule"
        for s in route["services"]:
            svc = one(overlay, "Service", s["name"])
            assert s["port"] in [p["port"] for p in svc["spec"]["ports"]]
    # Every service's own API prefix is reachable.
    owners = {o for o in PUBLIC_PATHS.values()}
    assert owners == set(SERVICES)


def test_prod_ingress_is_tls_only():
    (ingress,) = objects("prod", "IngressRoute")
    assert ingress["spec"]["entryPoints"] == ["websecure"]
    assert ingress["spec"]["tls"]["secretName"]


# ---------------------------------------------------------------------------- broker, db, otel


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rabbitmq_cluster_defaults_to_quorum_queues(overlay):
    rmq = one(overlay, "RabbitmqCluster", "ldt-rabbitmq")
    assert rmq["apiVersion"] == "rabbitmq.com/v1beta1"
    assert "default_queue_type = quorum" in rmq["spec"]["rabbitmq"]["additionalConfig"]
    assert rmq["spec"]["image"].startswith("rabbitmq:3.13")
    assert rmq["spec"]["replicas"] == (3 if overlay == "prod" else 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_point_at_the_cluster_services(overlay):
    """Dev: the generated URLs name the in-cluster hosts (ldt-rabbitmq, ldt-postgres) and match
    the dev RabbitMQ user and PostgreSQL password."""
    if overlay == "prod":
        assert objects("prod", "Secret") == [], "prod generates no Secret"
        return
    import base64
    creds = generated("dev", "Secret", "ldt-credentials")["data"]
    amqp = base64.b64decode(creds["amqp-url"]).decode()
    db = base64.b64decode(creds["database-url"]).decode()
    assert re.fullmatch(r"amqp://ldt:[^@]+@ldt-rabbitmq:5672/%2f", amqp)
    assert re.fullmatch(r"postgres://ldt:[^@]+@ldt-postgres:5432", db)
    rmq_conf = one("dev", "RabbitmqCluster", "ldt-rabbitmq")["spec"]["rabbitmq"]["additionalConfig"]
    rmq_pass = re.search(r"^default_pass = (.+)$", rmq_conf, re.M).group(1)
    assert amqp == f"amqp://ldt:{rmq_pass}@ldt-rabbitmq:5672/%2f"
    pg_pass = base64.b64decode(generated("dev", "Secret", "ldt-postgres-password")["data"]["password"]).decode()
    assert db == f"postgres://ldt:{pg_pass}@ldt-postgres:5432"
    for value in (amqp, db, pg_pass, rmq_pass):
        assert "dev-only" in value, "dev credentials are visibly dev-only"


def test_dev_postgres_statefulset():
    sts = one("dev", "StatefulSet", "ldt-postgres")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("postgres:16")
    assert sts["spec"]["volumeClaimTemplates"], "data on a PVC"
    assert {m["name"] for m in c["volumeMounts"]} >= {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    svc = one("dev", "Service", "ldt-postgres")
    assert svc["spec"]["ports"][0]["port"] == 5432
    assert selects({"matchLabels": svc["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    env = env_of(c)
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    assert env["POSTGRES_USER"]["value"] == "ldt"
    assert objects("dev", "Cluster") == []


def test_prod_postgres_is_a_cnpg_cluster():
    cluster = one("prod", "Cluster", "ldt-postgres")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert cluster["spec"]["instances"] == 3
    assert ":16" in cluster["spec"]["imageName"]
    (role,) = [r for r in cluster["spec"]["managed"]["roles"] if r["name"] == "ldt"]
    assert role["login"] and role["createdb"], "each service creates its own database"
    assert role["passwordSecret"]["name"]
    assert objects("prod", "StatefulSet") == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_otel_collector(overlay):
    dep = one(overlay, "Deployment", "otel-collector")
    svc = one(overlay, "Service", "otel-collector")
    assert 4317 in [p["port"] for p in svc["spec"]["ports"]]
    assert selects({"matchLabels": svc["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
    cm = generated(overlay, "ConfigMap", "otel-collector-config")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    exporters = config["exporters"]
    assert any(e.get("endpoint") == "signoz-otel-collector.platform.svc.cluster.local:4317"
               for e in exporters.values())
    traces = config["service"]["pipelines"]["traces"]
    assert set(traces["exporters"]) <= set(exporters) and "batch" in traces["processors"]
    c = container(deployment(overlay, "order"))
    env = effective_env(overlay, c)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert f"deployment.environment={overlay}" in env["OTEL_RESOURCE_ATTRIBUTES"]


# ---------------------------------------------------------------------------- overlays


@pytest.mark.parametrize("service", SERVICES)
def test_dev_one_replica_with_fault_injection(service):
    dep = deployment("dev", service)
    assert dep["spec"]["replicas"] == 1
    assert effective_env("dev", container(dep))["LDT_FAULT_INJECTION"] == "true"
    assert objects("dev", "HorizontalPodAutoscaler") == []


@pytest.mark.parametrize("service", SERVICES)
def test_prod_replicas_hpa_pdb_antiaffinity(service):
    dep = deployment("prod", service)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2

    hpas = [h for h in objects("prod", "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                               "name": f"ldt-{service}"}]
    assert len(hpas) == 1
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"], "scales on a metric"

    pdbs = [p for p in objects("prod", "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    assert len(pdbs) == 1
    assert pdbs[0]["spec"]["minAvailable"] == 1
    # the PDB covers this service only
    for other in SERVICES:
        if other != service:
            assert not selects(pdbs[0]["spec"]["selector"],
                               deployment("prod", other)["spec"]["template"]["metadata"]["labels"])

    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and selects(t["podAffinityTerm"]["labelSelector"], labels) for t in terms)


@pytest.mark.parametrize("service", SERVICES)
def test_prod_settings(service):
    c = container(deployment("prod", service))
    env = effective_env("prod", c)
    assert env["LDT_FAULT_INJECTION"] == "false"
    assert env["LDT_ADMIN_TOKEN"] == ("secret", "ldt-admin", "token")
    assert env["LDT_AMQP_URL"] == ("secret", "ldt-credentials", "amqp-url")
    assert env["LDT_DATABASE_URL"] == ("secret", "ldt-credentials", "database-url")
    image = c["image"]
    assert "@sha256:" in image or re.search(r":[^:/]+$", image), "a tag or digest"
    assert not image.endswith(":latest") and not image.endswith(":dev")
    assert c["imagePullPolicy"] == "IfNotPresent"


def test_prod_database_connections_fit():
    """Every replica of every service at the HPA maximum, with a pool per service database and
    one admin connection each, stays within PostgreSQL's max_connections."""
    cluster = one("prod", "Cluster", "ldt-postgres")
    max_conn = int(cluster["spec"]["postgresql"]["parameters"]["max_connections"])
    total = 0
    for s in SERVICES:
        pool = int(effective_env("prod", container(deployment("prod", s)))["LDT_DB_POOL_SIZE"])
        (hpa,) = [h for h in objects("prod", "HorizontalPodAutoscaler")
                  if h["spec"]["scaleTargetRef"]["name"] == f"ldt-{s}"]
        total += hpa["spec"]["maxReplicas"] * (pool + 1)
    assert total < max_conn - 10, (total, max_conn)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_in_namespace_ldt(overlay):
    for d in docs(overlay):
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == "ldt"
        else:
            assert d["metadata"].get("namespace") == "ldt", f"{d['kind']}/{d['metadata']['name']}"


# ---------------------------------------------------------------------------- the validator


def _validator_problems(objs: list[dict]) -> list[str]:
    return validate.validate([("test", o) for o in objs], ["1.30"])


def test_validator_accepts_the_prod_render():
    assert _validator_problems(docs("prod")) == []


def test_validator_rejects_mistakes():
    dep = copy.deepcopy(deployment("prod", "order"))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")  # typo
    assert any("readinesProbe" in p for p in _validator_problems([dep]))

    hpa = copy.deepcopy(objects("prod", "HorizontalPodAutoscaler")[0])
    hpa["spec"]["minReplicas"] = "two"
    assert _validator_problems([hpa])

    ingress = copy.deepcopy(objects("prod", "IngressRoute")[0])
    del ingress["spec"]["routes"][0]["match"]
    assert any("match" in p for p in _validator_problems([ingress]))

    rmq = copy.deepcopy(one("prod", "RabbitmqCluster", "ldt-rabbitmq"))
    rmq["spec"]["replica"] = 3  # typo
    assert _validator_problems([rmq])

    cluster = copy.deepcopy(one("prod", "Cluster", "ldt-postgres"))
    cluster["spec"]["instances"] = 0
    assert _validator_problems([cluster])

    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "ldt"},
               "spec": {}}
    assert any("no schema" in p for p in _validator_problems([unknown]))

    no_ns = copy.deepcopy(one("prod", "Service", "ldt-order"))
    del no_ns["metadata"]["namespace"]
    assert _validator_problems([no_ns])


# ---------------------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service(service):
    compose = _compose()
    s = compose["services"][service]
    assert s["command"] == ["serve", service]
    assert s["image"] == "ldt:local" and s["build"]["context"] == "../.."
    assert s["restart"] == "unless-stopped"
    assert s["healthcheck"]["test"]
    for dep in ("postgres", "rabbitmq"):
        assert s["depends_on"][dep]["condition"] == "service_healthy"
    env = s["environment"]
    assert env["OTEL_SERVICE_NAME"] == f"ldt-{service}"
    assert env["LDT_HTTP_ADDR"] == "0.0.0.0:8080"
    for k, v in env.items():
        assert not CREDENTIAL_URL.search(str(v)), k
        assert not SECRET_NAME.search(k), k
    assert s["stop_grace_period"] == "30s"


def test_compose_infrastructure():
    compose = _compose()
    services = compose["services"]
    assert services["order"]["ports"] == ["${LDT_BIND:-127.0.0.1}:${LDT_HTTP_PORT:-8000}:8080"]
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"]
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    for name in ("postgres", "rabbitmq"):
        assert services[name]["healthcheck"]["test"]
    for s in services.values():
        for k, v in (s.get("environment") or {}).items():
            assert not CREDENTIAL_URL.search(str(v)), k
            assert not re.search(r"pass(word)?$", k, re.I) or str(v).startswith("${"), k
    config = yaml.safe_load((DEPLOY / "compose" / "otel-collector.yaml").read_text())
    assert any(e.get("endpoint") == "jaeger:4317" for e in config["exporters"].values())


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile():
    import dockerfile

    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    froms = [c.value[0] for c in cmds if c.cmd == "FROM"]
    assert froms == ["rust:1-bookworm", "debian:bookworm-slim"]
    runs = " ".join(" ".join(c.value) for c in cmds if c.cmd == "RUN")
    assert "cargo build --release --locked --bin ldt" in runs
    assert "ca-certificates" in runs
    final = cmds[max(i for i, c in enumerate(cmds) if c.cmd == "FROM"):]

    def last(cmd):
        found = [c for c in final if c.cmd == cmd]
        assert found, cmd
        return found[-1]

    assert last("USER").value[0].split(":")[0] == "10001"
    assert last("ENTRYPOINT").json and list(last("ENTRYPOINT").value) == ["ldt"]
    assert last("CMD").json and list(last("CMD").value) == ["up"]
    assert "8080" in last("EXPOSE").value
    env = dict(zip(last("ENV").value[::2], last("ENV").value[1::2]))
    assert env["LDT_HTTP_ADDR"] == "0.0.0.0:8080"
    # `docker run ldt` is the embedded mode: its data goes to a volume the user owns.
    assert env["LDT_DATA_DIR"] == "/var/lib/ldt"
    assert "/var/lib/ldt" in " ".join(last("VOLUME").value)
    assert "install -d -o 10001 -g 10001" in runs
    hc = last("HEALTHCHECK")
    assert hc.value[0] == "CMD" and "/healthz" in " ".join(hc.value)
    assert any(c.cmd == "COPY" and "/usr/local/bin/ldt" in c.value for c in final)

    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("target/", ".git/", "ldt-data/", "*.log"):
        assert entry in ignored

    # The build needs every crate of the workspace and every patched dependency of Cargo.toml.
    import tomllib

    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    needed = {m.split("/")[0] for m in manifest["workspace"]["members"]}
    for patches in manifest.get("patch", {}).values():
        needed |= {p["path"].split("/")[0] for p in patches.values() if "path" in p}
    copied = {c.value[0].rstrip("/") for c in cmds if c.cmd == "COPY" and len(c.value) == 2}
    assert "vendor" in needed
    assert needed <= copied, needed - copied
