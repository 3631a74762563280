"""The Helm chart, rendered offline for every values file: lint, the
Kubernetes schemas, the operators' own schemas, and what the deployment
promises (every setting wired, probes, limits, security, autoscaling,
public routes only, one migration hook)."""

import glob
import json
import os
import re

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (CHART, ENVIRONMENTS, EXAMPLES, NAMESPACE, RELEASE, REPO, ROLES, SCHEMAS,
                      all_rendered, config_table_variables, contract_path, deep_merge, documents,
                      of_kind, render_raw, values_for)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]
CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "kafka.strimzi.io/", "postgresql.cnpg.io/")
PUBLIC_ROUTES = ["/support/tickets", "/ticket", "/webhooks", "/confirm", "/graphql"]
RECOMMENDED_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                      "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"]


def workloads(docs):
    return {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}


def role_of(deployment):
    return deployment["metadata"]["labels"]["app.kubernetes.io/component"]


def container(pod_owner):
    [c] = pod_owner["spec"]["template"]["spec"]["containers"]
    return c


# --- lint and schemas -----------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_helm_lint_is_clean(env):
    report = helm.lint(CHART, values_for(env), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], (report["errors"], problems)


def test_builtin_resources_match_the_kubernetes_schemas(manifests):
    for doc in manifests:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {e.message} at {list(e.path)}")


def strict_schema(schema):
    """The API server's strict field validation (kubectl's default): an
    unknown field is an error, except where the schema preserves unknown
    fields."""
    if isinstance(schema, dict):
        schema = {k: strict_schema(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    return schema


def custom_resource_validator(doc):
    with open(os.path.join(SCHEMAS, "SOURCES.json")) as f:
        sources = json.load(f)
    for name, source in sources.items():
        if source["apiVersion"] == doc["apiVersion"] and source["kind"] == doc["kind"]:
            with open(os.path.join(SCHEMAS, name)) as f:
                schema = strict_schema(json.load(f))
            # The schema's `metadata` is only `type: object`; the API server
            # checks metadata itself.
            schema["properties"]["metadata"] = {"type": "object"}
            return jsonschema.Draft7Validator(schema)
    pytest.fail(f"no vendored schema for {doc['apiVersion']} {doc['kind']} (deploy/tests/schemas/vendor.py)")


def assert_valid_custom_resource(doc):
    errors = sorted(custom_resource_validator(doc).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}" for e in errors]


def test_custom_resources_match_their_operators_schemas(manifests):
    for doc in manifests:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            assert_valid_custom_resource(doc)


def example_documents():
    docs = []
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))):
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def test_examples_match_their_operators_schemas():
    docs = example_documents()
    kinds = {d["kind"] for d in docs}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "Cluster"} <= kinds
    for doc in docs:
        assert "namespace" not in doc["metadata"], "examples are applied into the release's namespace"
        assert_valid_custom_resource(doc)


def test_the_validators_reject_what_they_should():
    """The checks above can fail: a misspelled field and a wrong type are
    caught by both kinds of schema."""
    deployment = next(d for d in of_kind(documents(render_raw({})), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    scaled = next(d for d in documents(render_raw({})) if d["kind"] == "ScaledObject")
    scaled["spec"]["maxReplicaCount"] = "many"
    assert list(custom_resource_validator(scaled).iter_errors(scaled))
    scaled["spec"]["maxReplicaCount"] = 3
    scaled["spec"]["maxReplicaCounts"] = 3
    assert list(custom_resource_validator(scaled).iter_errors(scaled))


# --- what the deployment promises ------------------------------------------------


def wired_variables(doc, configmaps):
    """The environment variable names a pod's container receives."""
    c = container(doc)
    names = {e["name"] for e in c.get("env", [])}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, "only ConfigMaps are read with envFrom"
        names |= set(configmaps[ref["name"]]["data"])
    return names


def documented_variables():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = config_table_variables(f.read())
    assert len(readme) >= 20, f"README's configuration table parsed to only {sorted(readme)}"
    contract = set()
    path = contract_path()
    if path:
        with open(path) as f:
            contract = config_table_variables(f.read())
        assert len(contract) >= 20, f"CONTRACT.md's configuration table parsed to only {sorted(contract)}"
    return readme | contract


def test_every_documented_setting_is_wired_into_every_pod(manifests):
    expected = documented_variables()
    configmaps = {d["metadata"]["name"]: d for d in of_kind(manifests, "ConfigMap")}
    pods = of_kind(manifests, "Deployment") + of_kind(manifests, "Job")
    assert pods
    for doc in pods:
        missing = expected - wired_variables(doc, configmaps)
        assert not missing, (
            f"{doc['kind']}/{doc['metadata']['name']} does not get {sorted(missing)}: add them to "
            "`config` (non-secret) or `secrets.env` (secret) in deploy/helm/casebook/values.yaml")


def test_secrets_come_from_secret_references_only(manifests):
    secret_names = {"DATABASE_URL", "CASEBOOK_JWT_SECRET", "CASEBOOK_AUDIT_SIGNING_KEY", "TWILIO_AUTH_TOKEN",
                    "GMAIL_PUSH_TOKEN", "GMAIL_ACCESS_TOKEN", "LLM_API_KEY", "LLM_FALLBACK_API_KEY"}
    assert not of_kind(manifests, "Secret"), "the chart references an existing Secret, never holds one"
    for cm in of_kind(manifests, "ConfigMap"):
        assert not secret_names & set(cm.get("data", {})), cm["metadata"]["name"]
    for doc in of_kind(manifests, "Deployment") + of_kind(manifests, "Job"):
        env = {e["name"]: e for e in container(doc).get("env", [])}
        for name in secret_names:
            assert "secretKeyRef" in env[name]["valueFrom"], name
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["optional"] is False
        assert env["CASEBOOK_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is False


def test_every_role_has_probes_limits_and_a_security_context(env, manifests):
    deployments = workloads(manifests)
    roles = sorted(role_of(d) for d in deployments.values())
    assert roles == (["all"] if env == "dev" else sorted(ROLES))
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        c = container(d)
        assert c["args"] == ["serve", "--role", role_of(d)], name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["ops"] == 9090
        if role_of(d) in ("api", "all"):
            assert ports["http"] == 8080
        else:
            assert "http" not in ports, f"{name} serves no public listener"
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "ops"}, name
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}, name
        assert c["startupProbe"]["httpGet"]["port"] == "ops", name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name} {kind}"
        psc, csc = pod["securityContext"], c["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert csc["allowPrivilegeEscalation"] is False, name
        assert csc["readOnlyRootFilesystem"] is True, name
        assert csc["capabilities"]["drop"] == ["ALL"] and "add" not in csc["capabilities"], name
        assert csc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        # /tmp is the only writable path.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name
        assert set(mounts) <= {"/tmp", "/var/lib/casebook/archive"}, name
        # Longer than the service's 30 s graceful stop (src/app.rs, serve)
        # plus the preStop pause.
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] > 30 + pre_stop, name


def test_dev_runs_everything_in_one_pod():
    docs = documents(render_raw(values_for("dev")))
    [d] = of_kind(docs, "Deployment")
    assert container(d)["args"] == ["serve", "--role", "all"] and d["spec"]["replicas"] == 1
    assert not of_kind(docs, "ScaledObject") and not of_kind(docs, "HorizontalPodAutoscaler")
    api = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-api"))
    assert api["spec"]["selector"]["app.kubernetes.io/component"] == "all"


def partitions(values):
    return int(deep_merge(helm_defaults(), values)["config"]["CASEBOOK_KAFKA_PARTITIONS"])


def helm_defaults():
    with open(os.path.join(CHART, "values.yaml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("env", ["default", "staging", "prod"])
def test_agent_and_delivery_scale_on_their_consumer_groups_lag(env):
    values = deep_merge(helm_defaults(), values_for(env))
    prefix = values["config"]["KAFKA_TOPIC_PREFIX"]
    docs = documents(render_raw(values_for(env)))
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "ScaledObject")}
    expected_topics = {
        "agent": [f"{prefix}.tickets.incoming"],
        "delivery": [f"{prefix}.channels.{ch}.outbound" for ch in ("email", "whatsapp", "webform")],
    }
    assert sorted(scaled) == [f"{RELEASE}-agent", f"{RELEASE}-delivery"]
    deployments = workloads(docs)
    for role, topics in expected_topics.items():
        so = scaled[f"{RELEASE}-{role}"]["spec"]
        keda = values["roles"][role]["keda"]
        assert so["maxReplicaCount"] == keda["maxReplicas"] <= partitions(values_for(env))
        assert so["minReplicaCount"] == keda["minReplicas"]
        assert [t["metadata"]["topic"] for t in so["triggers"]] == topics
        for t in so["triggers"]:
            assert t["type"] == "kafka"
            assert t["metadata"]["consumerGroup"] == f"{prefix}.{role}"
            assert t["metadata"]["lagThreshold"] == str(keda["lagThreshold"])
            assert t["metadata"]["activationLagThreshold"] == str(keda["activationLagThreshold"])
            assert t["metadata"]["bootstrapServers"] == values["config"]["KAFKA_BROKERS"]
        # The autoscaler owns the replica count.
        assert "replicas" not in deployments[f"{RELEASE}-{role}"]["spec"]


def test_max_replicas_above_the_partitions_fails_the_render():
    values = {"config": {"CASEBOOK_KAFKA_PARTITIONS": "4"}, "roles": {"agent": {"keda": {"maxReplicas": 5}}}}
    with pytest.raises(helm.HelmRenderError, match=r"maxReplicas \(5\) exceeds CASEBOOK_KAFKA_PARTITIONS \(4\)"):
        render_raw(values)
    values["roles"]["agent"]["keda"]["maxReplicas"] = 4
    assert of_kind(documents(render_raw(values)), "ScaledObject")


def test_api_scales_on_cpu_and_relay_keeps_a_standby():
    docs = documents(render_raw(values_for("prod")))
    [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-api"
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    relay = workloads(docs)[f"{RELEASE}-relay"]
    assert relay["spec"]["replicas"] == 2
    targets = {d["spec"]["scaleTargetRef"]["name"] for d in of_kind(docs, "ScaledObject") + [hpa]}
    assert f"{RELEASE}-relay" not in targets


def test_every_role_has_a_disruption_budget(manifests):
    pdbs = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: d
            for d in of_kind(manifests, "PodDisruptionBudget")}
    for d in of_kind(manifests, "Deployment"):
        assert role_of(d) in pdbs, d["metadata"]["name"]
        assert pdbs[role_of(d)]["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook(manifests):
    [job] = of_kind(manifests, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    c = container(job)
    assert c["args"] == ["migrate"]
    # A hook runs before the release's ConfigMap exists: no envFrom.
    assert "envFrom" not in c
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] >= 1
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("env", ["staging", "prod"])
def test_the_ingress_routes_public_paths_only(env):
    docs = documents(render_raw(values_for(env)))
    [ingress] = of_kind(docs, "Ingress")
    [rule] = ingress["spec"]["rules"]
    paths = [p["path"] for p in rule["http"]["paths"]]
    assert sorted(paths) == sorted(PUBLIC_ROUTES)
    for p in rule["http"]["paths"]:
        assert p["backend"]["service"] == {"name": f"{RELEASE}-api", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]


def test_an_operations_path_in_the_ingress_fails_the_render():
    for path in ("/metrics", "/ready", "/health", "/"):
        with pytest.raises(helm.HelmRenderError, match="not a public route"):
            render_raw({"ingress": {"enabled": True, "host": "x.example.com", "tls": {"secretName": "t"},
                                    "paths": ["/ticket", path]}})


def test_services_expose_http_and_ops(manifests):
    services = {d["metadata"]["name"]: d for d in of_kind(manifests, "Service")}
    api = services[f"{RELEASE}-api"]["spec"]
    assert {p["name"]: p["port"] for p in api["ports"]} == {"http": 8080, "ops": 9090}
    ops = services[f"{RELEASE}-ops"]["spec"]
    assert ops["clusterIP"] == "None" and [p["port"] for p in ops["ports"]] == [9090]
    assert ops["publishNotReadyAddresses"] is True, "unready pods are scraped too"
    for d in of_kind(manifests, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in ops["selector"].items()), d["metadata"]["name"]


def test_network_policies_deny_by_default(manifests):
    policies = {d["metadata"]["name"]: d["spec"] for d in of_kind(manifests, "NetworkPolicy")}
    base = policies[RELEASE]
    assert set(base["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in base["ingress"] for p in rule["ports"]] == [9090]
    api = policies[f"{RELEASE}-api"]
    assert [p["port"] for rule in api["ingress"] for p in rule["ports"]] == [8080]
    # Every pod of the release is covered.
    for d in of_kind(manifests, "Deployment") + of_kind(manifests, "Job"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in base["podSelector"]["matchLabels"].items())


def test_recommended_labels_and_the_release_namespace_everywhere(manifests):
    for doc in manifests:
        meta = doc["metadata"]
        assert meta.get("namespace") == NAMESPACE, f"{doc['kind']}/{meta['name']}"
        missing = [k for k in RECOMMENDED_LABELS if k not in meta.get("labels", {})]
        assert not missing, f"{doc['kind']}/{meta['name']} lacks {missing}"
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_no_template_hard_codes_a_namespace():
    for path in glob.glob(os.path.join(CHART, "templates", "*")):
        with open(path) as f:
            for line in f:
                if re.match(r"\s*namespace:", line):
                    assert "{{ .Release.Namespace }}" in line or "$.Release.Namespace" in line, (path, line)


def test_a_missing_secret_name_fails_the_render():
    with pytest.raises(helm.HelmRenderError, match="secrets.existingSecret"):
        render_raw({"secrets": {"existingSecret": ""}})


def test_prod_reads_the_database_url_from_cloudnativepg():
    docs = documents(render_raw(values_for("prod")))
    examples = example_documents()
    [cluster] = [d for d in examples if d["kind"] == "Cluster"]
    [kafka] = [d for d in examples if d["kind"] == "Kafka"]
    for d in of_kind(docs, "Deployment"):
        env = {e["name"]: e for e in container(d)["env"]}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{cluster['metadata']['name']}-app", "key": "uri", "optional": False}
    [cm] = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == RELEASE]
    assert cm["data"]["KAFKA_BROKERS"] == f"{kafka['metadata']['name']}-kafka-bootstrap:9092"
    # The example's topics carry the prefix and partition count prod uses.
    topics = [d for d in examples if d["kind"] == "KafkaTopic"]
    assert topics and all(t["spec"]["partitions"] == int(cm["data"]["CASEBOOK_KAFKA_PARTITIONS"]) for t in topics)
    assert all(t["spec"]["topicName"].startswith(cm["data"]["KAFKA_TOPIC_PREFIX"] + ".") for t in topics)
    assert "CREATE EXTENSION IF NOT EXISTS vector" in cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQL"]


def test_every_environment_renders_the_same_kinds_of_guarantees():
    kinds = {}
    for env, doc in all_rendered():
        kinds.setdefault(env, set()).add(doc["kind"])
    for env in ENVIRONMENTS:
        assert {"Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget", "NetworkPolicy"} <= kinds[env]
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HorizontalPodAutoscaler", "Ingress"} <= kinds["prod"]


def test_a_role_can_run_another_image_tag_for_a_staged_upgrade():
    docs = documents(render_raw({"image": {"tag": "1.4.0"}, "roles": {"api": {"imageTag": "1.3.2"}}}))
    images = {role_of(d): container(d)["image"] for d in of_kind(docs, "Deployment")}
    assert images.pop("api") == "ghcr.io/casebook/casebook:1.3.2"
    assert set(images.values()) == {"ghcr.io/casebook/casebook:1.4.0"}
    [job] = of_kind(docs, "Job")
    assert container(job)["image"] == "ghcr.io/casebook/casebook:1.4.0", "migrations run the new release"


@pytest.mark.parametrize("bad", [
    {"roles": {"agent": {"keda": {"maxReplica": 3}}}},
    {"ingres": {"enabled": True}},
    {"config": {"kafka_brokers": "x:9092"}},
    {"image": {"digest": "latest"}},
    {"metrics": {"prometheusRule": {"escalationRate": 20}}},
])
def test_values_with_a_typo_or_a_wrong_type_are_refused(bad):
    with pytest.raises(helm.HelmError, match="schema"):
        render_raw(bad)


def test_a_grace_period_shorter_than_the_shutdown_fails_the_render():
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render_raw({"terminationGracePeriodSeconds": 30})


# Settings of the local stack and its tests only; a cluster must not set them.
LOCAL_ONLY = {"CASEBOOK_LOCAL_STACK", "CASEBOOK_TANSU_BIN"}


def variables_read_by_the_code():
    names = set()
    for crate in ("src", "api", "commands", "projections", "replay", "domain"):
        for path in glob.glob(os.path.join(REPO, crate, "**", "*.rs"), recursive=True):
            if "/tests/" in path or path.endswith("/tests.rs"):
                continue
            with open(path, encoding="utf-8") as f:
                names |= set(re.findall(r'\b(?:var|var_os|env::var)\("([A-Z][A-Z0-9_]+)"\)', f.read()))
    return names


def test_every_setting_the_code_reads_is_wired_and_local_ones_are_not(manifests):
    read = variables_read_by_the_code()
    assert {"DATABASE_URL", "KAFKA_BROKERS", "CASEBOOK_HTTP_ADDR"} <= read, sorted(read)
    configmaps = {d["metadata"]["name"]: d for d in of_kind(manifests, "ConfigMap")}
    for doc in of_kind(manifests, "Deployment") + of_kind(manifests, "Job"):
        wired = wired_variables(doc, configmaps)
        assert not (read - LOCAL_ONLY) - wired, (doc["metadata"]["name"], sorted((read - LOCAL_ONLY) - wired))
        assert not LOCAL_ONLY & wired, doc["metadata"]["name"]
