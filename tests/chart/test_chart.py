"""The Helm chart, rendered with real Helm (helm-python-sdk) and checked against
the Kubernetes OpenAPI schemas (kubernetes-validate) and what the issue asks."""

from __future__ import annotations

import re

import helm_python
import kubernetes_validate
import pytest

from chartlib import (
    CHART,
    GCE,
    IMDS,
    NAMESPACE,
    RELEASE,
    container,
    contract_env_vars,
    deep_merge,
    env,
    kinds,
    notes,
    one,
    render,
    render_raw,
)

PRESETS = {"aws-vpc-cni": "eni+", "calico": "cali+", "cilium": "lxc+", "gke": "gke+"}

# Every values combination the suite renders and validates.
SCENARIOS = {
    "default": {},
    **{f"preset-{p}": {"intercept": {"preset": p}} for p in PRESETS},
    "preset-custom": {"intercept": {"preset": "custom", "interfaces": ["veth+", "cni0"]}},
    "gce-only": GCE,
    "gke-pool": {"gce": {"enabled": True, "workloadIdentityProvider": "my-project.svc.id.goog", "projectNumber": "123456789012",
                         "clusterIssuer": "https://container.googleapis.com/v1/projects/my-project/locations/europe-west1/clusters/prod"}},
    "imds-only": IMDS,
    "both": deep_merge(GCE, IMDS, {"imds": {"tokenSource": "google"}}),
    "everything": deep_merge(
        GCE,
        IMDS,
        {
            "gce": {"stsUrl": "http://sts.test:8080", "iamCredentialsUrl": "https://iam.test"},
            "imds": {"allowV1": True, "stsUrl": "http://aws-sts.test"},
            "cluster": {"name": "prod", "location": "eu-west-1"},
            "intercept": {"preset": "cilium", "interfaces": ["eni+"], "backend": "iptables-legacy"},
            "startupTaint": {"enabled": True},
            "admissionPolicy": {"tokenAudiences": ["sts.amazonaws.com"]},
            "dns": {"coreDNS": {"enabled": True}},
            "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
            "debugWhoami": True,
            "extraArgs": ["--foo=bar"],
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "image": {"digest": "sha256:" + "a" * 64},
            "imagePullSecrets": [{"name": "regcred"}],
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "platform"},
            "serviceAccount": {"annotations": {"x": "y"}},
        },
    ),
}

# Kubernetes versions the chart supports (Chart.yaml kubeVersion >= 1.30) and
# the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version() + ".0"]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid_kubernetes(scenario):
    objs = render(SCENARIOS[scenario])
    assert "DaemonSet" in kinds(objs)
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue  # no OpenAPI schema shipped; checked structurally below
        for version in KUBE_VERSIONS:
            # strict: unknown fields (a typo in a template) are errors too.
            kubernetes_validate.validate(obj, version, strict=True)


def test_validation_catches_a_broken_object():
    """The validator itself rejects what a broken template would produce."""
    ds = one(render(), "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("scenario", ["default", "everything"])
def test_lint_is_clean(scenario):
    report = helm_python.lint(str(CHART), SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # severity 2 = warning, 3 = error (info such as "icon is recommended" is fine)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_errors():
    report = helm_python.lint(str(CHART), {"intercept": {"preset": "flannel"}}, strict=True, kube_version="v1.30.0")
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


# --- the DaemonSet --------------------------------------------------------------


def test_daemonset_pod_spec(default_objs):
    ds = one(default_objs, "DaemonSet", RELEASE)
    assert ds["metadata"]["namespace"] == NAMESPACE
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # Tolerate every taint (including the startup taint metabridge removes).
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == one(default_objs, "ServiceAccount")["metadata"]["name"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == "10%"
    # Fargate cannot run DaemonSets; we tolerate its taint, so exclude it.
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "eks.amazonaws.com/compute-type", "operator": "NotIn", "values": ["fargate"]} in terms[0]["matchExpressions"]


def test_container_security_context(default_objs):
    sc = container(default_objs)["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # iptables needs uid 0 (see the chart README); explicit, not inherited.
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    pod = one(default_objs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostPID" not in pod and "hostIPC" not in pod


def test_downward_api_env(default_objs):
    e = env(default_objs)
    assert e["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert e["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}


def test_xtables_lock_is_the_hosts(default_objs):
    ds = one(default_objs, "DaemonSet")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container(default_objs)["volumeMounts"]}
    lock = mounts["/run/xtables.lock"]
    assert vols[lock["name"]]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not lock.get("readOnly", False)
    # No other host path: the rest of the host stays invisible.
    assert [v["name"] for v in vols.values() if "hostPath" in v] == [lock["name"]]


@pytest.mark.parametrize("ports", [{}, {"metadata": 18989, "admin": 18990}])
def test_probes_and_listeners_agree(ports):
    objs = render({"ports": ports} if ports else {})
    c = container(objs)
    e = env(objs)
    admin = ports.get("admin", 8990)
    metadata = ports.get("metadata", 8989)
    by_name = {p["name"]: p for p in c["ports"]}
    assert by_name["admin"]["containerPort"] == admin
    assert by_name["metadata"]["containerPort"] == metadata
    assert "hostPort" not in by_name["admin"]  # implied by hostNetwork
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert e["METABRIDGE_ADMIN_LISTEN"] == f"0.0.0.0:{admin}"
    assert e["METABRIDGE_LISTEN"] == f"0.0.0.0:{metadata}"


def test_prestop_removes_rules():
    c = container(render({"intercept": {"chain": "MB_TEST"}}))
    assert c["lifecycle"]["preStop"]["exec"]["command"] == [
        "/usr/local/bin/metabridge", "iptables", "remove", "--iptables-chain", "MB_TEST",
    ]
    assert env(render({"intercept": {"chain": "MB_TEST"}}))["METABRIDGE_IPTABLES_CHAIN"] == "MB_TEST"
    assert "METABRIDGE_KEEP_RULES_ON_EXIT" not in env(render({}))


def test_remove_on_stop_false_keeps_the_rules_through_restarts():
    # Fail closed: neither the preStop hook nor the daemon's own shutdown
    # removes the rules.
    objs = render({"intercept": {"removeOnStop": False}})
    assert "lifecycle" not in container(objs)
    assert env(objs)["METABRIDGE_KEEP_RULES_ON_EXIT"] == "true"


def test_resources_are_set(default_objs):
    r = container(default_objs)["resources"]
    assert r["requests"]["cpu"] and r["requests"]["memory"]
    assert r["limits"]["memory"]
    assert "cpu" not in r.get("limits", {})  # throttling = metadata latency


def test_image_reference():
    assert container(render())["image"] == "ghcr.io/metabridge/metabridge:0.1.0"
    assert container(render({"image": {"tag": "v9"}}))["image"].endswith(":v9")
    digest = "sha256:" + "b" * 64
    assert container(render({"image": {"digest": digest}}))["image"] == f"ghcr.io/metabridge/metabridge@{digest}"
    assert container(render())["args"] == ["run"]


@pytest.mark.parametrize("preset,pattern", PRESETS.items())
def test_intercept_presets(preset, pattern):
    assert env(render({"intercept": {"preset": preset}}))["METABRIDGE_INTERCEPT_INTERFACES"] == pattern


def test_intercept_custom_and_extra_interfaces():
    e = env(render({"intercept": {"preset": "custom", "interfaces": ["veth+", "cni0"]}}))
    assert e["METABRIDGE_INTERCEPT_INTERFACES"] == "veth+,cni0"
    e = env(render({"intercept": {"preset": "calico", "interfaces": ["eni+", "cali+"]}}))
    assert e["METABRIDGE_INTERCEPT_INTERFACES"] == "cali+,eni+"


GKE_POOL = SCENARIOS["gke-pool"]


def test_gke_builtin_pool():
    e = env(render(GKE_POOL))
    assert e["METABRIDGE_GCP_WORKLOAD_IDENTITY_PROVIDER"] == "my-project.svc.id.goog"
    assert e["METABRIDGE_GCP_PROJECT_NUMBER"] == "123456789012"
    assert e["METABRIDGE_GCP_CLUSTER_ISSUER"].startswith("https://container.googleapis.com/v1/projects/my-project/")
    incomplete = deep_merge(GKE_POOL, {"gce": {"clusterIssuer": ""}})
    with pytest.raises(helm_python.HelmError, match="projectNumber and gce.clusterIssuer"):
        render(incomplete)


def test_aws_type_provider_and_audiences():
    e = env(render(deep_merge(GCE, IMDS, {
        "gce": {"providerType": "aws", "tokenAudience": "//iam.googleapis.com/x"},
        "imds": {"tokenAudience": "aws-aud", "googleAudience": "g-aud", "sessionDuration": "2h"},
        "cacheKey": "pod"})))
    assert e["METABRIDGE_GCP_PROVIDER_TYPE"] == "aws"
    assert e["METABRIDGE_GCP_TOKEN_AUDIENCE"] == "//iam.googleapis.com/x"
    assert e["METABRIDGE_AWS_TOKEN_AUDIENCE"] == "aws-aud"
    assert e["METABRIDGE_AWS_GOOGLE_AUDIENCE"] == "g-aud"
    assert e["METABRIDGE_AWS_SESSION_DURATION"] == "2h"
    assert e["METABRIDGE_CACHE_KEY"] == "pod"
    assert env(render(GCE))["METABRIDGE_GCP_PROVIDER_TYPE"] == "oidc"


def test_gce_only():
    e = env(render(GCE))
    assert e["METABRIDGE_GCP_WORKLOAD_IDENTITY_PROVIDER"] == GCE["gce"]["workloadIdentityProvider"]
    assert e["METABRIDGE_GCP_PROJECT_ID"] == "my-project"
    assert not [k for k in e if k.startswith("METABRIDGE_AWS_") or k.startswith("METABRIDGE_IMDS_")]
    assert "METABRIDGE_GCP_STS_URL" not in e  # empty → the binary's default


def test_imds_only():
    e = env(render(IMDS))
    assert e["METABRIDGE_AWS_REGION"] == "eu-west-1"
    assert e["METABRIDGE_AWS_TOKEN_SOURCE"] == "kubernetes"
    assert e["METABRIDGE_IMDS_ALLOW_V1"] == "false"
    assert not [k for k in e if k.startswith("METABRIDGE_GCP_")]


def test_both_apis_and_overrides():
    e = env(render(SCENARIOS["everything"]))
    assert e["METABRIDGE_GCP_WORKLOAD_IDENTITY_PROVIDER"].startswith("projects/123456789012/")
    assert e["METABRIDGE_GCP_STS_URL"] == "http://sts.test:8080"
    assert e["METABRIDGE_GCP_IAMCREDENTIALS_URL"] == "https://iam.test"
    assert e["METABRIDGE_AWS_STS_URL"] == "http://aws-sts.test"
    assert e["METABRIDGE_IMDS_ALLOW_V1"] == "true"
    assert e["METABRIDGE_CLUSTER_NAME"] == "prod" and e["METABRIDGE_CLUSTER_LOCATION"] == "eu-west-1"
    assert e["METABRIDGE_IPTABLES"] == "iptables-legacy"
    assert e["METABRIDGE_STARTUP_TAINT"] == "metabridge.io/agent-not-ready"
    assert e["METABRIDGE_DEBUG_WHOAMI"] == "true"
    assert e["RUST_BACKTRACE"] == "1"
    assert container(render(SCENARIOS["everything"]))["args"] == ["run", "--foo=bar"]


# The chart may only set what the binary reads (docs/CONTRACTS.md and the
# README's configuration reference), plus the downward-API HOST_IP the
# binary's --intercept-to default uses.


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_env_names_are_the_binarys(scenario):
    names = set(env(render(SCENARIOS[scenario]))) - {"RUST_BACKTRACE"}  # extraEnv
    unknown = names - contract_env_vars() - {"HOST_IP"}
    assert not unknown, f"env vars not in docs/CONTRACTS.md: {unknown}"


# --- RBAC -----------------------------------------------------------------------


def rules(objs):
    got = {}
    for r in one(objs, "ClusterRole")["rules"]:
        assert r["apiGroups"] == [""], r
        assert "resourceNames" not in r
        for res in r["resources"]:
            got.setdefault(res, set()).update(r["verbs"])
    return got


BASE_RULES = {
    "pods": {"get", "list", "watch"},
    "serviceaccounts": {"get", "list", "watch"},
    "serviceaccounts/token": {"create"},
    # The daemon watches its own Node (fieldSelector metadata.name=NODE).
    "nodes": {"get", "list", "watch"},
}


def test_rbac_least_privilege(default_objs):
    assert rules(default_objs) == BASE_RULES
    binding = one(default_objs, "ClusterRoleBinding")
    sa = one(default_objs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one(default_objs, "ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    # No namespaced Role sneaking in more.
    assert not [o for o in default_objs if o["kind"] in ("Role", "RoleBinding")]


def test_rbac_startup_taint_adds_only_node_patch():
    objs = render({"startupTaint": {"enabled": True}})
    assert rules(objs) == {**BASE_RULES, "nodes": {"get", "list", "watch", "patch"}}


def test_rbac_can_be_left_to_the_user():
    objs = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert "ClusterRole" not in kinds(objs) and "ServiceAccount" not in kinds(objs)
    assert one(objs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


# --- values.schema.json ---------------------------------------------------------

BAD_VALUES = {
    "top-level typo": {"imagee": {"tag": "x"}},
    "nested typo": {"gce": {"enabled": True, "workloadIdentityprovider": "x"}},
    "imds typo": {"imds": {"enabeld": True}},
    "monitor typo": {"metrics": {"serviceMonitor": {"enable": True}}},
    "unknown preset": {"intercept": {"preset": "flannel"}},
    "custom preset without interfaces": {"intercept": {"preset": "custom"}},
    "gce without provider": {"gce": {"enabled": True}},
    "provider with project id, not number": {
        "gce": {"enabled": True, "workloadIdentityProvider": "projects/my-project/locations/global/workloadIdentityPools/p/providers/x"}},
    "imds without region": {"imds": {"enabled": True}},
    "not a region": {"imds": {"enabled": True, "region": "Ireland"}},
    "google token source without gce": {"imds": {"enabled": True, "region": "us-east-1", "tokenSource": "google"}},
    "bad token source": {"imds": {"tokenSource": "aws"}},
    "bad provider type": {"gce": {"providerType": "saml"}},
    "project number not a number": {"gce": {"projectNumber": "my-project"}},
    "bad cache key": {"cacheKey": "node"},
    "bad session duration": {"imds": {"sessionDuration": "an hour"}},
    "port out of range": {"ports": {"admin": 70000}},
    "bad duration": {"podLookupTimeout": "400"},
    "bad log format": {"logFormat": "xml"},
    "bad backend": {"intercept": {"backend": "nft"}},
    "bad interface pattern": {"intercept": {"interfaces": ["eni+; rm -rf /"]}},
    "bad taint key": {"startupTaint": {"enabled": True, "key": "not a key"}},
    "string for bool": {"imds": {"allowV1": "yes"}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_refuses(case):
    with pytest.raises(helm_python.HelmValuesError):
        render(BAD_VALUES[case])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_schema_accepts_scenarios(scenario):
    with helm_python.Chart.load(str(CHART)) as chart:
        chart.validate_schema(SCENARIOS[scenario])


def test_template_refuses_equal_ports():
    with pytest.raises(helm_python.HelmError, match="must differ"):
        render({"ports": {"metadata": 9000, "admin": 9000}})


# --- ValidatingAdmissionPolicies (CEL evaluated with cel-python) ----------------


def cel_eval(expr: str, activation: dict) -> bool:
    import celpy

    env_ = celpy.Environment()
    prog = env_.program(env_.compile(expr))
    result = prog.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    if isinstance(result, Exception):
        raise result
    return bool(result)


def policy(objs, suffix):
    p = one(objs, "ValidatingAdmissionPolicy", f"{RELEASE}-{suffix}")
    b = one(objs, "ValidatingAdmissionPolicyBinding", f"{RELEASE}-{suffix}")
    assert b["spec"]["policyName"] == p["metadata"]["name"]
    assert b["spec"]["validationActions"] == ["Deny"]
    assert p["spec"]["failurePolicy"] == "Fail"
    return p


def allowed(p, activation) -> bool:
    """matchConditions gate; then every validation must hold."""
    if not all(cel_eval(c["expression"], activation) for c in p["spec"]["matchConditions"]):
        return True
    return all(cel_eval(v["expression"], activation) for v in p["spec"]["validations"])


ME = {"username": f"system:serviceaccount:{NAMESPACE}:{RELEASE}",
      "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}
TAINT = {"key": "metabridge.io/agent-not-ready", "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}


def node(name="node-a", taints=(TAINT, OTHER), labels=None, unschedulable=None):
    n = {"metadata": {"name": name, "labels": labels or {"kubernetes.io/os": "linux"}}, "spec": {}}
    if taints:
        n["spec"]["taints"] = list(taints)
    if unschedulable is not None:
        n["spec"]["unschedulable"] = unschedulable
    return n


def test_startup_taint_policy():
    p = policy(render({"startupTaint": {"enabled": True}}), "startup-taint")
    assert p["spec"]["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}]

    def ok(new, old=None, user=ME):
        return allowed(p, {"object": new, "oldObject": old or node(), "request": {"userInfo": user}})

    assert ok(node(taints=[OTHER]))                       # remove our taint from our node
    assert ok(node(taints=None), node(taints=[TAINT]))    # last taint: spec.taints disappears
    assert ok(node(), node())                             # no-op patch
    assert not ok(node("node-b", taints=[OTHER]), node("node-b"))          # someone else's node
    assert not ok(node(taints=[OTHER]), user={"username": ME["username"]})  # no node in user info
    assert not ok(node(taints=[TAINT]))                   # removes another taint
    assert not ok(node(taints=[TAINT, OTHER, {"key": "x", "effect": "NoSchedule"}]))  # adds one
    assert not ok(node(taints=[OTHER], labels={"kubernetes.io/os": "linux", "evil": "1"}))
    assert not ok(node(taints=[OTHER], unschedulable=True))  # cordon
    # Other users are not this policy's business.
    assert ok(node("node-b", taints=[]), node("node-b"), user={"username": "admin"})


def test_token_request_policy():
    p = policy(render(), "token-requests")
    assert p["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["serviceaccounts/token"]

    def ok(spec, user=ME):
        return allowed(p, {"object": {"spec": spec}, "request": {"userInfo": user}})

    bound = {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u"}
    assert ok({"audiences": ["sts.amazonaws.com"], "boundObjectRef": bound})
    assert not ok({"audiences": ["sts.amazonaws.com"]})  # free-standing token
    assert not ok({"audiences": ["x"], "boundObjectRef": {**bound, "kind": "Secret"}})
    assert not ok({"boundObjectRef": bound})  # API server's own audience
    assert not ok({"audiences": [], "boundObjectRef": bound})
    assert ok({}, user={"username": "system:serviceaccount:kube-system:other"})

    p = policy(render({"admissionPolicy": {"tokenAudiences": ["sts.amazonaws.com", "//iam.googleapis.com/x"]}}), "token-requests")
    assert ok({"audiences": ["sts.amazonaws.com"], "boundObjectRef": bound})
    assert not ok({"audiences": ["sts.amazonaws.com", "https://kubernetes.default.svc"], "boundObjectRef": bound})


def test_admission_policies_optional():
    objs = render({"admissionPolicy": {"enabled": False}, "startupTaint": {"enabled": True}})
    assert "ValidatingAdmissionPolicy" not in kinds(objs)
    assert "ValidatingAdmissionPolicy" not in kinds(render({"admissionPolicy": {"enabled": False}}))
    assert [o["metadata"]["name"] for o in render() if o["kind"] == "ValidatingAdmissionPolicy"] == [f"{RELEASE}-token-requests"]


# --- CoreDNS --------------------------------------------------------------------


def corefile_blocks(corefile: str) -> dict[str, str]:
    """Top-level server blocks {zone: body}; asserts braces balance."""
    blocks, depth, head, body = {}, 0, "", []
    for raw in corefile.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if depth == 0:
            assert line.endswith("{"), f"expected a server block, got {line!r}"
            head, body = line[:-1].strip(), []
        else:
            body.append(line)
        depth += line.count("{") - line.count("}")
        assert depth >= 0, "unbalanced braces"
        if depth == 0:
            blocks[head] = "\n".join(body)
    assert depth == 0, "unbalanced braces"
    return blocks


def test_coredns_off_by_default(default_objs):
    assert "ConfigMap" not in kinds(default_objs)


def test_coredns_configmap():
    objs = render({"dns": {"coreDNS": {"enabled": True}}}, namespace="metabridge")
    cm = one(objs, "ConfigMap", "coredns")
    assert cm["metadata"]["namespace"] == "kube-system"
    assert cm["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    blocks = corefile_blocks(cm["data"]["Corefile"])
    assert set(blocks) == {".:53", "metadata.google.internal:53"}
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa" in blocks[".:53"]
    md = blocks["metadata.google.internal:53"]
    assert re.search(r"^169\.254\.169\.254 metadata\.google\.internal$", md, re.M)
    assert "fallthrough" not in md  # the name must never leak upstream


def test_coredns_custom_base():
    base = ".:53 {\n    errors\n    forward . 10.0.0.2\n}\n"
    cm = one(render({"dns": {"coreDNS": {"enabled": True, "baseCorefile": base, "ttl": 5}}}), "ConfigMap")
    blocks = corefile_blocks(cm["data"]["Corefile"])
    assert blocks[".:53"].splitlines()[:2] == ["errors", "forward . 10.0.0.2"]
    assert "ttl 5" in blocks["metadata.google.internal:53"]
    with pytest.raises(helm_python.HelmError, match="already mentions"):
        render({"dns": {"coreDNS": {"enabled": True, "baseCorefile": base + "metadata.google.internal { }\n"}}})


# --- monitoring -----------------------------------------------------------------


def test_service_monitor_targets_the_admin_port():
    objs = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}})
    ds = one(objs, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    svc = one(objs, "Service")
    sm = one(objs, "ServiceMonitor")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "admin" and port["port"] == 8990
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["metadata"]["labels"]["release"] == "kps"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == port["name"] and ep["path"] == "/metrics"


def test_pod_monitor_targets_the_admin_port():
    objs = render({"metrics": {"podMonitor": {"enabled": True, "interval": "15s"}}})
    pod_labels = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    pm = one(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in {p["name"] for p in container(objs)["ports"]} and ep["port"] == "admin"
    assert ep["path"] == "/metrics" and ep["interval"] == "15s"
    assert "Service" not in kinds(objs)


def test_monitors_off_by_default(default_objs):
    assert not {"ServiceMonitor", "PodMonitor", "Service"} & set(kinds(default_objs))


# --- NOTES.txt ------------------------------------------------------------------


def test_notes_say_what_to_annotate():
    n = notes(GCE)
    assert "iam.gke.io/gcp-service-account" in n
    assert "principal://iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/POOL/subject/system:serviceaccount:NAMESPACE:SA" in n
    assert "hostAliases" in n  # CoreDNS change not enabled → the alternative
    assert "eks.amazonaws.com/role-arn" not in n
    n = notes(IMDS)
    assert "eks.amazonaws.com/role-arn" in n and ":sub" in n
    assert "iam.gke.io/gcp-service-account=" not in n
    assert "WARNING" in notes({}) and "WARNING" not in notes(GCE)
    assert "metabridge.io/agent-not-ready=true:NoSchedule" in notes({"startupTaint": {"enabled": True}})


def test_notes_warn_about_gke_google_paths():
    gke_imds = deep_merge(IMDS, {"intercept": {"preset": "gke"}})
    assert "pods' Google credential requests now get 404" in notes(gke_imds)
    assert "404" not in notes(deep_merge(gke_imds, GCE))
    assert "pods' Google credential requests" not in notes(IMDS)  # EKS: no GKE server to replace
