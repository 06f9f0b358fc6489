"""The Helm chart, as a platform engineer relies on it: it lints, renders with the default and the
production values, every object is valid for Kubernetes 1.30 and the newest schemas bundled with
kubernetes-validate (offline), bad values are refused with a message naming them, every service
of the code is deployed on its own port with the health names the servers really serve, and every
setting the chart passes is one the services accept."""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from services.cli import registry
from services.cli.main import build_parser
from services.core.server import LIVENESS_HEALTH
from services.core.settings import Settings
from services.gateway.settings import GatewaySettings
from tests.deploy.conftest import (
    CHART,
    FULLNAME_PREFIX,
    NAMESPACE,
    PRODUCTION,
    RELEASE,
    Manifest,
    Render,
    by_name,
    of_kind,
    run_helm,
)

pytestmark = pytest.mark.deploy

FULLNAME = FULLNAME_PREFIX
#: Kinds whose schemas are not Kubernetes' own (CRDs); kubernetes-validate has none for them, so
#: they are checked by hand below (test_service_monitor_scrapes_the_metrics_port).
CRD_KINDS = {"ServiceMonitor"}
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def pod_specs(objects: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Every pod this release would run: Deployments' and Jobs' templates, and bare Pods (tests)."""
    out = {}
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            out[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            out[f"Pod/{o['metadata']['name']}"] = o["spec"]
    return out


#: Services that speak HTTP rather than gRPC: their port is named "http" and their probes are HTTP.
HTTP_SERVICES = {"gateway"}


def port_name(service: str) -> str:
    return "http" if service in HTTP_SERVICES else "grpc"


def container(deployment: Manifest) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# -- lint and render -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_helm_lint_is_clean(helm: Path, values: Path | None) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_object_is_valid_kubernetes(which: str, request: pytest.FixtureRequest) -> None:
    objects: list[Manifest] = request.getfixturevalue(f"{which}_objects")
    checked = 0
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for {version}: {exc.message}")
        checked += 1
    assert checked >= 20, f"only {checked} objects rendered"


def test_the_validation_catches_an_invalid_object(default_objects: list[Manifest]) -> None:
    """The validator would notice a broken manifest (strict: unknown fields too), so the test above can fail."""
    deployment = copy.deepcopy(by_name(default_objects, "Deployment")[f"{FULLNAME}-ingest"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_production_example_turns_on_what_it_claims(production_objects: list[Manifest]) -> None:
    kinds = {o["kind"] for o in production_objects}
    assert {"NetworkPolicy", "ServiceMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for deployment in of_kind(production_objects, "Deployment"):
        c = container(deployment)
        env = env_of(c)
        assert env["TESSERA_REDIS_CLUSTER"]["value"] == "true"
        assert env["TESSERA_TLS_CERT_FILE"]["value"].startswith("/etc/tessera/tls/")
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


# -- bad values are refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "imagee.tag=1"], "'imagee' not allowed"),
        (["--set", "services.ingest.prot=50051"], "'prot' not allowed"),
        (["--set", "services.ingest.autoscaling.maxReplica=3"], "'maxReplica' not allowed"),
        (["--set", "services.gatewy.enabled=true"], "'gatewy' not allowed"),
        (["--set", "services.gateway.ingress.hots=cdp.example.com"], "'hots' not allowed"),
        (["--set", "services.ingest.port=abc"], "/services/ingest/port"),
        (["--set-json", 'redis.cluster="yes"'], "/redis/cluster"),
        (["--set", "config.logLevel=LOUD"], "/config/logLevel"),
        (["--set", "tls.enabled=true"], "/tls/existingSecret"),
        (["--set", "postgresql.existingSecret="], "/postgresql/existingSecret"),
        (["--set", "networkPolicy.postgresql.cidrs={10.0.0.0}"], "/networkPolicy/postgresql/cidrs/0"),
        (["--set", "config.leaderRenewSeconds=30"], "must be below config.leaderLeaseSeconds"),
        (["--set", "services.profile.autoscaling.minReplicas=11"], "minReplicas (11) is above maxReplicas (10)"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(helm: Path, args: list[str], message: str) -> None:
    done = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert done.returncode != 0, f"{args} rendered"
    assert message in done.stderr, done.stderr


def test_clusters_older_than_1_30_are_refused(helm: Path) -> None:
    """The chart uses 1.30 APIs (preStop sleep, unhealthyPodEvictionPolicy, matchLabelKeys)."""
    old = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.29.0")
    assert old.returncode != 0 and "kubeVersion" in old.stderr
    assert run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.30.0").returncode == 0


def _object_schemas(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append((path, node))
        for key, child in node.items():
            if key not in ("if", "then", "else"):  # conditions on a level, not levels of their own
                found += _object_schemas(child, f"{path}/{key}")
    elif isinstance(node, list):
        for n, child in enumerate(node):
            found += _object_schemas(child, f"{path}/{n}")
    return found


def test_schema_refuses_unknown_keys_at_every_level() -> None:
    """Each object either lists its keys (and refuses others) or is a declared map of strings
    (labels, annotations, env); only Helm's reserved `global` takes anything."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    objects = _object_schemas(schema, "")
    assert len(objects) > 30
    for path, node in objects:
        if path == "/properties/global":
            continue
        extra = node.get("additionalProperties")
        if "properties" in node:
            assert extra is False, f"{path} accepts unknown keys"
        else:
            assert isinstance(extra, dict) and extra.get("type") == "string", f"{path} is an open object"


def test_every_value_is_in_the_schema_and_the_readme() -> None:
    """values.yaml, values.schema.json and the README's table describe the same keys."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    defs = schema["definitions"]

    def leaves(v: Any, s: dict[str, Any], prefix: str) -> list[str]:
        while "$ref" in s:
            s = defs[s["$ref"].rsplit("/", 1)[-1]]
        if isinstance(v, dict) and "properties" in s:
            assert set(v) <= set(s["properties"]), f"{prefix}: {set(v) - set(s['properties'])} not in the schema"
            out = []
            for key, child in v.items():
                out += leaves(child, s["properties"][key], f"{prefix}.{key}" if prefix else key)
            return out
        return [prefix]

    keys = leaves(values, schema, "")
    assert len(keys) > 60
    generic = {k.replace(f"services.{s}.", "services.<name>.") for k in keys for s in values["services"]}
    for key in generic:
        if key.startswith("services.") and not key.startswith("services.<name>."):
            continue
        assert f"`{key}`" in readme, f"{key} is not in helm/tessera/README.md"


# -- the services the code has, on their ports, with their health names ------------------------------------------


def test_each_service_in_the_code_has_its_deployment_on_its_default_port(default_objects: list[Manifest]) -> None:
    available = registry.available()
    assert available, "no services found in the code"
    deployments = by_name(default_objects, "Deployment")
    services = by_name(default_objects, "Service")
    assert set(deployments) == {f"{FULLNAME}-{s}" for s in available}
    assert set(services) == set(deployments)
    for service in available:
        default_port = registry.port(service, environ={})
        c = container(deployments[f"{FULLNAME}-{service}"])
        assert c["args"] == ["serve", service]
        name = port_name(service)
        grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}[name]
        assert grpc_port == default_port, f"{service}: chart {grpc_port}, code {default_port}"
        assert env_of(c)[f"TESSERA_{service.upper()}_PORT"]["value"] == str(default_port)
        svc_port = {p["name"]: p for p in services[f"{FULLNAME}-{service}"]["spec"]["ports"]}[name]
        assert svc_port["port"] == default_port and svc_port["targetPort"] == name


def test_chart_values_list_exactly_the_services_in_the_code() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values["services"]) == set(registry.available())
    assert set(schema["properties"]["services"]["properties"]) == set(registry.available())


def test_probes_ask_the_health_names_the_servers_serve(default_objects: list[Manifest]) -> None:
    """Readiness follows the server's overall health (NOT_SERVING while PostgreSQL or Redis are down);
    startup and liveness follow the process only, so a database outage restarts nothing."""
    for deployment in of_kind(default_objects, "Deployment"):
        c = container(deployment)
        port = c["ports"][0]["containerPort"]
        if c["name"] in HTTP_SERVICES:
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            continue
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": ""}
        assert c["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS_HEALTH}
        assert c["startupProbe"]["grpc"] == {"port": port, "service": LIVENESS_HEALTH}


def test_tls_probes_run_tessera_health_with_the_services_certificate_name(production_objects: list[Manifest]) -> None:
    parser = build_parser()
    for deployment in of_kind(production_objects, "Deployment"):
        name = deployment["metadata"]["name"]
        c = container(deployment)
        if c["name"] in HTTP_SERVICES:  # HTTP probes, checked above; TLS for browsers ends at the Ingress
            assert "httpGet" in c["readinessProbe"]
            continue
        port = c["ports"][0]["containerPort"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        for probe, service in (("readinessProbe", ""), ("livenessProbe", LIVENESS_HEALTH)):
            command = c[probe]["exec"]["command"]
            assert command[0] == "tessera"
            args = parser.parse_args(command[1:])
            assert args.command == "health"
            assert args.address == f"localhost:{port}"
            assert args.service == service
            assert args.server_name == f"{name}.{NAMESPACE}.svc"
            assert str(args.ca_file).rsplit("/", 1)[0] in mounts
            assert c[probe]["timeoutSeconds"] > args.timeout


# -- what the pods are told ------------------------------------------------------------------------------------


def _known_settings() -> set[str]:
    names = {"TESSERA_" + f.metadata["env"] for f in fields(Settings)}
    for service in registry.available():
        names |= {"TESSERA_" + f.metadata["env"] for f in fields(registry.definition(service).settings_type)}
    return names


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_tessera_variable_is_a_real_setting_and_the_services_accept_them(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A misspelt TESSERA_* name would be ignored silently by the services: none may appear. And
    the values the chart renders parse: Settings.from_env takes the whole environment."""
    objects: list[Manifest] = request.getfixturevalue(f"{which}_objects")
    known = _known_settings()
    (tmp_path / "tls.crt").write_text("x")
    (tmp_path / "tls.key").write_text("x")
    secrets = {
        "TESSERA_DATABASE_URL": "postgresql://u:p@db:5432/tessera",
        "TESSERA_REDIS_URL": "redis://redis:6379/0",
        "TESSERA_SERVICE_TOKEN": "t" * 40,
    }
    for spec_name, spec in pod_specs(objects).items():
        for c in spec["containers"]:
            env: dict[str, str] = {}
            for name, e in env_of(c).items():
                assert name.startswith(("TESSERA_", "OTEL_", "POD_")), f"{spec_name}: {name}"
                if name.startswith("TESSERA_"):
                    assert name in known, f"{spec_name}: {name} is not a Tessera setting"
                if "valueFrom" in e:
                    ref = e["valueFrom"].get("secretKeyRef")
                    if ref is not None:
                        env[name] = secrets[name]
                    continue
                env[name] = e["value"]
            for tls in ("TESSERA_TLS_CERT_FILE", "TESSERA_TLS_KEY_FILE"):
                if tls in env:
                    env[tls] = str(tmp_path / Path(env[tls]).name)
            settings = Settings.from_env(env)
            component = c["name"]
            if component in registry.available():
                registry.definition(component).settings_type.from_env(env)
                assert settings.database_url and settings.redis_url


def test_urls_and_tokens_come_from_existing_secrets_only(production_objects: list[Manifest]) -> None:
    assert not of_kind(production_objects, "Secret"), "the chart must not create Secrets"
    for spec_name, spec in pod_specs(production_objects).items():
        if spec_name.startswith("Pod/"):
            continue
        env = env_of(spec["containers"][0])
        assert env["TESSERA_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tessera-postgresql", "key": "url"}
        assert env["TESSERA_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tessera-redis", "key": "url"}
        assert env["TESSERA_SERVICE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tessera-service-token"


def test_profile_is_told_where_the_other_services_answer(
    default_objects: list[Manifest], variant_objects: list[Manifest]
) -> None:
    env = env_of(container(by_name(default_objects, "Deployment")[f"{FULLNAME}-profile"]))
    for peer, port in (("identity", 50052), ("ingest", 50051), ("metrics", 50054)):
        address = env[f"TESSERA_PROFILE_{peer.upper()}_ADDRESS"]["value"]
        assert address == f"{FULLNAME}-{peer}.{NAMESPACE}.svc:{port}"
        assert f"{FULLNAME}-{peer}" in by_name(default_objects, "Service")
    # services.metrics.enabled=false: no metrics objects, and profile is told there is none.
    assert f"{FULLNAME}-metrics" not in by_name(variant_objects, "Deployment")
    env = env_of(container(by_name(variant_objects, "Deployment")[f"{FULLNAME}-profile"]))
    assert env["TESSERA_PROFILE_METRICS_ADDRESS"]["value"] == "none"


def test_pods_carry_downward_api_and_otel_variables(production_objects: list[Manifest]) -> None:
    for deployment in of_kind(production_objects, "Deployment"):
        env = env_of(container(deployment))
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert env["OTEL_SERVICE_NAME"]["value"] == f"tessera-{component}"
        attrs = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert "k8s.pod.name=$(POD_NAME)" in attrs and "k8s.namespace.name=$(POD_NAMESPACE)" in attrs
        # $(VAR) expands only from variables defined earlier in the list.
        names = [e["name"] for e in container(deployment)["env"]]
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability.svc:4317"
        assert env["TESSERA_PROMETHEUS_PORT"]["value"] == "9464"
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container(deployment)["ports"]


# -- hardening ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_pod_is_hardened_and_writes_only_to_tmp(which: str, request: pytest.FixtureRequest) -> None:
    objects: list[Manifest] = request.getfixturevalue(f"{which}_objects")
    specs = pod_specs(objects)
    assert len(specs) >= 9  # four services, the migration Job, four test Pods
    for name, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in volumes[tmp["name"]], name
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name


def test_services_spread_and_survive_disruptions(default_objects: list[Manifest]) -> None:
    hpas = by_name(default_objects, "HorizontalPodAutoscaler")
    pdbs = by_name(default_objects, "PodDisruptionBudget")
    for name, deployment in by_name(default_objects, "Deployment").items():
        template = deployment["spec"]["template"]
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert template["metadata"]["labels"].items() >= labels.items()
        spread = template["spec"]["topologySpreadConstraints"]
        assert {s["topologyKey"] for s in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        assert all(s["labelSelector"]["matchLabels"] == labels for s in spread)
        assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpas[name]["apiVersion"] == "autoscaling/v2"
        assert pdbs[name]["apiVersion"] == "policy/v1" and pdbs[name]["spec"]["selector"]["matchLabels"] == labels
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace > 20 + 5, "the pod must outlive the preStop sleep and the server's shutdown grace"


def test_service_account_may_use_leases_and_nothing_else(default_objects: list[Manifest]) -> None:
    (role,) = of_kind(default_objects, "Role")
    (binding,) = of_kind(default_objects, "RoleBinding")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            # read_namespaced_lease, create_namespaced_lease, replace_namespaced_lease: no more.
            "verbs": ["get", "create", "update"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = by_name(default_objects, "ServiceAccount")[FULLNAME]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    for deployment in of_kind(default_objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == sa["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is True  # leader election needs the token


def test_without_rbac_the_leader_is_elected_in_postgresql(default_objects: list[Manifest], render: Render) -> None:
    """With no Role for Leases a Lease election could never win: the chart falls back to the
    advisory lock rather than leave every singleton without a leader."""
    for deployment in of_kind(default_objects, "Deployment"):
        assert env_of(container(deployment))["TESSERA_LEADER_BACKEND"]["value"] == "auto"
    without = render("--set", "rbac.create=false")
    assert not of_kind(without, "Role")
    for deployment in of_kind(without, "Deployment"):
        assert env_of(container(deployment))["TESSERA_LEADER_BACKEND"]["value"] == "postgres"
    forced = render("--set", "rbac.create=false", "--set", "config.leaderBackend=kubernetes")
    for deployment in of_kind(forced, "Deployment"):
        assert env_of(container(deployment))["TESSERA_LEADER_BACKEND"]["value"] == "kubernetes"


def test_a_replicated_redis_waits_for_its_replica(
    default_objects: list[Manifest], production_objects: list[Manifest]
) -> None:
    for objects, want in ((default_objects, "0"), (production_objects, "1")):
        for deployment in of_kind(objects, "Deployment"):
            assert env_of(container(deployment))["TESSERA_REDIS_WAIT_REPLICAS"]["value"] == want


# -- migrations and helm test -------------------------------------------------------------------------------------


def test_migrations_run_as_a_hook_after_what_they_need(default_objects: list[Manifest]) -> None:
    (job,) = of_kind(default_objects, "Job")
    hook = job["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] >= 0
    assert "before-hook-creation" in hook["helm.sh/hook-delete-policy"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    args = build_parser().parse_args(c["args"])
    assert args.command == "migrate"
    # What the Job needs must exist before it: its ServiceAccount is a hook of lower weight (normal
    # objects are created only after pre-install hooks), and it reads only existing Secrets.
    sa = by_name(default_objects, "ServiceAccount")[pod["serviceAccountName"]]
    sa_hook = sa["metadata"]["annotations"]
    assert "pre-install" in sa_hook["helm.sh/hook"] and "pre-upgrade" in sa_hook["helm.sh/hook"]
    assert int(sa_hook["helm.sh/hook-weight"]) < int(hook["helm.sh/hook-weight"])
    assert not of_kind(default_objects, "Secret")
    assert all("secretKeyRef" in e["valueFrom"] for e in c["env"] if e["name"].endswith("_URL"))


@pytest.mark.parametrize("which", ["default", "production"])
def test_helm_test_checks_every_service_through_its_service(which: str, request: pytest.FixtureRequest) -> None:
    objects: list[Manifest] = request.getfixturevalue(f"{which}_objects")
    pods = of_kind(objects, "Pod")
    parser = build_parser()
    targets = set()
    for pod in pods:
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        c = pod["spec"]["containers"][0]
        if "command" in c:  # the HTTP gateway: its /readyz through its Service
            url = re.search(r"http://([^/']+)/readyz", c["command"][2])
            assert url is not None, c["command"]
            targets.add(url.group(1))
            continue
        args = parser.parse_args(c["args"])
        assert args.command == "health"
        targets.add(args.address)
        if which == "production":
            assert args.ca_file is not None
    services = by_name(objects, "Service")
    assert targets == {f"{n}.{NAMESPACE}.svc:{s['spec']['ports'][0]['port']}" for n, s in services.items()}


# -- options --------------------------------------------------------------------------------------------------


def test_network_policy_allows_only_the_release_the_listed_namespaces_and_the_dependencies(
    production_objects: list[Manifest],
) -> None:
    (policy,) = of_kind(production_objects, "NetworkPolicy")
    spec = policy["spec"]
    release = {"app.kubernetes.io/name": "tessera", "app.kubernetes.io/instance": RELEASE}
    assert spec["podSelector"]["matchLabels"] == release
    for obj in production_objects:
        if obj["kind"] in ("Deployment", "Job", "Pod"):
            meta = obj["spec"]["template"]["metadata"] if obj["kind"] != "Pod" else obj["metadata"]
            assert meta["labels"].items() >= release.items(), f"{obj['metadata']['name']} is outside the policy"
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    from_namespaces = spec["ingress"][1]["from"][0]["namespaceSelector"]["matchExpressions"][0]
    assert from_namespaces["values"] == ["agent-desktop", "crm-sync", "monitoring"]
    assert {p["port"] for p in spec["ingress"][1]["ports"]} == {50051, 50052, 50053, 50054, 8080, 9464}
    egress = {
        (block["ipBlock"]["cidr"], port["port"])
        for rule in spec["egress"]
        for block in rule["to"]
        if "ipBlock" in block
        for port in rule["ports"]
    }
    assert ("10.20.0.0/24", 5432) in egress  # PostgreSQL
    assert ("10.20.1.0/24", 6379) in egress  # Redis
    assert ("10.30.0.0/16", 4317) in egress  # OTLP
    assert ("172.20.0.1/32", 443) in egress  # the Kubernetes API, for Leases
    dns = [r for r in spec["egress"] if any(p["port"] == 53 for p in r.get("ports", []))]
    assert dns and {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}


def test_service_monitor_scrapes_the_metrics_port(production_objects: list[Manifest]) -> None:
    (monitor,) = of_kind(production_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for service in of_kind(production_objects, "Service"):
        assert service["metadata"]["labels"].items() >= selector.items()
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}


def test_prometheus_annotations_are_optional(default_objects: list[Manifest], variant_objects: list[Manifest]) -> None:
    plain = of_kind(default_objects, "Deployment")[0]["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in plain.get("annotations", {})
    annotated = of_kind(variant_objects, "Deployment")[0]
    annotations = annotated["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9464",
        "prometheus.io/path": "/metrics",
    }


def test_dashboards_configmap_renders_with_and_without_dashboard_files(
    render: Render, default_objects: list[Manifest], tmp_path: Path
) -> None:
    assert not of_kind(default_objects, "ConfigMap"), "off by default"
    chart = tmp_path / "tessera"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("dashboards"))
    (chart / "dashboards").mkdir()
    assert not of_kind(render("--set", "dashboards.enabled=true", chart=chart), "ConfigMap")
    dashboard = {"title": "Tessera test", "panels": []}
    (chart / "dashboards" / "a-test.json").write_text(json.dumps(dashboard, indent=2))
    (chart / "dashboards" / "notes.txt").write_text("not a dashboard")
    only = ("--show-only", "templates/dashboards-configmap.yaml")
    (configmap,) = of_kind(render("--set", "dashboards.enabled=true", *only, chart=chart), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(configmap["data"]) == {"a-test.json"}
    assert json.loads(configmap["data"]["a-test.json"]) == dashboard
    kubernetes_validate.validate(configmap, "1.30.0", strict=True)


def test_fixed_replicas_without_autoscaling(variant_objects: list[Manifest]) -> None:
    assert by_name(variant_objects, "Deployment")[f"{FULLNAME}-identity"]["spec"]["replicas"] == 3
    assert f"{FULLNAME}-identity" not in by_name(variant_objects, "HorizontalPodAutoscaler")
    assert f"{FULLNAME}-ingest" in by_name(variant_objects, "HorizontalPodAutoscaler")


# -- the gateway -----------------------------------------------------------------------------------------------


def test_gateway_is_told_where_ingest_answers(default_objects: list[Manifest]) -> None:
    env = env_of(container(by_name(default_objects, "Deployment")[f"{FULLNAME}-gateway"]))
    ingest = by_name(default_objects, "Service")[f"{FULLNAME}-ingest"]
    host, port = env["TESSERA_GATEWAY_INGEST_ADDRESS"]["value"].rsplit(":", 1)
    assert host == f"{ingest['metadata']['name']}.{NAMESPACE}.svc"
    assert int(port) == ingest["spec"]["ports"][0]["port"]


def test_gateway_is_told_where_profile_and_metrics_answer(
    default_objects: list[Manifest], variant_objects: list[Manifest]
) -> None:
    """The JSON API's reads go to the profile and metrics Services; a disabled one is left out."""
    env = env_of(container(by_name(default_objects, "Deployment")[f"{FULLNAME}-gateway"]))
    services = by_name(default_objects, "Service")
    for peer in ("profile", "metrics"):
        host, port = env[f"TESSERA_GATEWAY_{peer.upper()}_ADDRESS"]["value"].rsplit(":", 1)
        assert host == f"{FULLNAME}-{peer}.{NAMESPACE}.svc"
        assert int(port) == services[f"{FULLNAME}-{peer}"]["spec"]["ports"][0]["port"]
    assert "TESSERA_GATEWAY_CORS_ORIGINS" not in env, "no cross-origin access unless origins are given"
    without_metrics = env_of(container(by_name(variant_objects, "Deployment")[f"{FULLNAME}-gateway"]))
    assert "TESSERA_GATEWAY_METRICS_ADDRESS" not in without_metrics
    assert "TESSERA_GATEWAY_PROFILE_ADDRESS" in without_metrics


def test_gateway_cors_origins_are_rendered_comma_joined(render: Render) -> None:
    objects = render(
        "--set", "services.gateway.corsOrigins[0]=https://console.example.com",
        "--set", "services.gateway.corsOrigins[1]=http://localhost:3000",
    )  # fmt: skip
    deployment = by_name(objects, "Deployment")[f"{FULLNAME}-gateway"]
    env = env_of(container(deployment))
    assert env["TESSERA_GATEWAY_CORS_ORIGINS"]["value"] == "https://console.example.com,http://localhost:3000"
    assert GatewaySettings.from_env({k: v["value"] for k, v in env.items() if "value" in v}).cors_origins == (
        "https://console.example.com",
        "http://localhost:3000",
    )
    for name, d in by_name(objects, "Deployment").items():
        if name != f"{FULLNAME}-gateway":
            assert "TESSERA_GATEWAY_CORS_ORIGINS" not in env_of(container(d)), name


@pytest.mark.parametrize(
    "value", ["https://console.example.com/", "console.example.com", "https://a.example.com,https://b.example.com"]
)
def test_gateway_cors_origins_must_be_origins(helm: Path, value: str) -> None:
    done = run_helm(
        helm, "template", RELEASE, str(CHART), "--set-json", f"services.gateway.corsOrigins={json.dumps([value])}"
    )
    assert done.returncode != 0
    assert "corsOrigins" in done.stderr


def test_gateway_ingress_is_optional_and_routes_to_the_http_port(
    default_objects: list[Manifest], render: Render
) -> None:
    assert not of_kind(default_objects, "Ingress")
    objects = render(
        "--set", "services.gateway.ingress.enabled=true",
        "--set", "services.gateway.ingress.host=cdp.example.com",
        "--set", "services.gateway.ingress.tlsSecret=cdp-tls",
        "--set", "services.gateway.ingress.className=nginx",
    )  # fmt: skip
    (ingress,) = of_kind(objects, "Ingress")
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(ingress, version, strict=True)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["cdp.example.com"], "secretName": "cdp-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "cdp.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-gateway", "port": {"name": "http"}}


def test_gateway_ingress_without_a_host_is_refused(helm: Path) -> None:
    done = run_helm(helm, "template", RELEASE, str(CHART), "--set", "services.gateway.ingress.enabled=true")
    assert done.returncode != 0
    assert "services.gateway.ingress.host" in done.stderr


def test_gateway_helm_test_asks_its_readiness_over_http(default_objects: list[Manifest]) -> None:
    pods = {o["metadata"]["name"]: o for o in of_kind(default_objects, "Pod")}
    c = pods[f"{FULLNAME}-gateway-test"]["spec"]["containers"][0]
    assert c["command"][:2] == ["python", "-c"]
    assert f"http://{FULLNAME}-gateway.{NAMESPACE}.svc:8080/readyz" in c["command"][2]
