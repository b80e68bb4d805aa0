"""deploy/terraform: every root module parses as HCL (python-hcl2), declares
the resources the seeds' flows need, and is internally consistent (every
var./local./resource reference resolves, variables and outputs are
documented, the tfvars examples set only declared variables). `terraform
validate` needs provider downloads, which this environment cannot do;
`terraform fmt -check` runs when terraform is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

from chartlib import REPO

TF = REPO / "deploy" / "terraform"
MODULES = ["google-eks", "google-eks/aws-provider", "aws-gke", "aws-google-trust"]


def unq(s):
    return s[1:-1] if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] == '"' else s


def load(module: str) -> dict:
    """Merge the module's .tf files: {"resource": {(type, name): body}, ...}."""
    out = {"resource": {}, "data": {}, "variable": {}, "output": {}, "locals": {}, "raw": []}
    files = sorted((TF / module).glob("*.tf"))
    assert files, module
    for f in files:
        with f.open() as fh:
            doc = hcl2.load(fh)
        out["raw"].append(doc)
        for kind in ("resource", "data"):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        key = (unq(rtype), unq(name))
                        assert key not in out[kind], f"{module}: {kind} {key} declared twice"
                        out[kind][key] = body
        for kind in ("variable", "output"):
            for block in doc.get(kind, []):
                for name, body in block.items():
                    out[kind][unq(name)] = body
        for block in doc.get("locals", []):
            out["locals"].update({k: v for k, v in block.items() if not k.startswith("__")})
    return out


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            if not k.startswith("__"):  # __inline_comments__, __is_block__
                yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def resources_of(mod, rtype):
    return {name: body for (t, name), body in mod["resource"].items() if t == rtype}


def data_of(mod, rtype):
    return {name: body for (t, name), body in mod["data"].items() if t == rtype}


def block(body, name):
    (b,) = body[name]
    return b


@pytest.mark.parametrize("module", MODULES)
def test_parses_and_is_consistent(module):
    mod = load(module)
    text = "\n".join(strings(mod["raw"]))
    for kind, name in re.findall(r"(?<![\w.])(var|local)\.([a-z_][a-z0-9_]*)", text):
        assert name in mod["variable" if kind == "var" else "locals"], f"{module}: {kind}.{name} is not declared"
    for rtype, name in re.findall(r"(?<![\w.])data\.([a-z0-9_]+)\.([a-z0-9_]+)", text):
        assert (rtype, name) in mod["data"], f"{module}: data.{rtype}.{name} is not declared"
    for rtype, name in re.findall(r"(?<![\w.])((?:google|aws)_[a-z0-9_]+)\.([a-z0-9_]+)", text):
        assert (rtype, name) in mod["resource"], f"{module}: {rtype}.{name} is not declared"
    for name, v in mod["variable"].items():
        assert unq(v.get("description")), f"{module}: variable {name} has no description"
        assert "type" in v, f"{module}: variable {name} has no type"
    for name, o in mod["output"].items():
        assert unq(o.get("description")), f"{module}: output {name} has no description"
    # Every variable is used.
    for name in mod["variable"]:
        assert re.search(rf"(?<![\w.])var\.{name}\b", text), f"{module}: variable {name} is unused"
    outs = set(mod["output"])
    assert {"helm_values", "service_account_annotations"} <= outs, f"{module}: outputs {outs}"


@pytest.mark.parametrize("module", MODULES)
def test_tfvars_example(module):
    path = TF / module / "terraform.tfvars.example"
    mod = load(module)
    with path.open() as fh:
        example = hcl2.load(fh)
    unknown = set(example) - set(mod["variable"])
    assert not unknown, f"{module}: example sets undeclared {unknown}"
    required = {n for n, v in mod["variable"].items() if "default" not in v}
    assert required <= set(example), f"{module}: example misses required {required - set(example)}"


def test_google_eks():
    mod = load("google-eks")
    assert resources_of(mod, "google_iam_workload_identity_pool")
    (prov,) = resources_of(mod, "google_iam_workload_identity_pool_provider").values()
    oidc = block(prov, "oidc")
    assert oidc["issuer_uri"] == "${var.eks_oidc_issuer_url}"
    assert "allowed_audiences" not in oidc  # aud = the provider's own name
    mapping = {unq(k): unq(v) for k, v in prov["attribute_mapping"].items()}
    assert mapping["google.subject"] == "assertion.sub"
    assert mapping["attribute.namespace"] == "assertion['kubernetes.io']['namespace']"
    assert mapping["attribute.service_account_name"] == "assertion['kubernetes.io']['serviceaccount']['name']"
    assert resources_of(mod, "google_service_account")
    (binding,) = resources_of(mod, "google_service_account_iam_member").values()
    assert unq(binding["role"]) == "roles/iam.workloadIdentityUser"
    principal = unq(mod["locals"]["principals"])
    assert "principal://iam.googleapis.com/${local.pool_name}/subject/system:serviceaccount:${w.namespace}:${w.service_account}" in principal
    assert binding["member"] == "${local.principals[each.key]}"


def test_google_eks_aws_provider_variant():
    mod = load("google-eks/aws-provider")
    (prov,) = resources_of(mod, "google_iam_workload_identity_pool_provider").values()
    assert block(prov, "aws")["account_id"] == "${var.aws_account_id}"
    mapping = {unq(k): unq(v) for k, v in prov["attribute_mapping"].items()}
    assert mapping["google.subject"] == "assertion.arn"
    assert mapping["attribute.aws_role"] == "assertion.arn.extract('assumed-role/{role}/')"
    assert resources_of(mod, "aws_iam_role")
    (binding,) = resources_of(mod, "google_service_account_iam_member").values()
    assert unq(binding["role"]) == "roles/iam.workloadIdentityUser"
    assert "principalSet://iam.googleapis.com/${local.pool_name}/attribute.aws_role/" in unq(binding["member"])
    conds = trust_conditions(mod)
    assert conds[":sub"] == ["system:serviceaccount:${each.value.namespace}:${each.value.service_account}"]
    assert conds[":aud"] == ["${var.token_audience}"]


def trust_conditions(mod) -> dict[str, list]:
    (doc,) = data_of(mod, "aws_iam_policy_document").values()
    stmt = block(doc, "statement")
    assert stmt["actions"] == ['"sts:AssumeRoleWithWebIdentity"'] or stmt["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    assert unq(stmt["effect"]) == "Allow"
    out = {}
    for c in stmt["condition"]:
        assert unq(c["test"]) == "StringEquals"
        var = unq(c["variable"])
        out[var[var.rindex(":"):]] = [unq(v) for v in c["values"]]
    principal = block(stmt, "principals")
    assert unq(principal["type"]) == "Federated"
    out["principal"] = [unq(i) for i in principal["identifiers"]]
    return out


def test_aws_gke():
    mod = load("aws-gke")
    (oidc,) = resources_of(mod, "aws_iam_openid_connect_provider").values()
    assert oidc["url"] == "${local.issuer_url}"
    assert oidc["client_id_list"] == ["${var.token_audience}"]
    issuer = unq(mod["locals"]["issuer_url"])
    assert issuer == "https://container.googleapis.com/v1/projects/${var.gke_project_id}/locations/${var.gke_location}/clusters/${var.gke_cluster_name}"
    assert resources_of(mod, "aws_iam_role")
    conds = trust_conditions(mod)
    assert conds[":sub"] == ["system:serviceaccount:${each.value.namespace}:${each.value.service_account}"]
    assert conds[":aud"] == ["${var.token_audience}"]
    assert conds["principal"] == ["${local.oidc_provider_arn}"]
    assert mod["variable"]["token_audience"]["default"] in ('"sts.amazonaws.com"', "sts.amazonaws.com")


def test_aws_google_trust():
    mod = load("aws-google-trust")
    assert resources_of(mod, "google_service_account") and resources_of(mod, "aws_iam_role")
    conds = trust_conditions(mod)
    assert conds["principal"] == ["accounts.google.com"]
    assert set(conds) == {"principal", ":aud"}
    (aud,) = conds[":aud"]
    assert aud == "${google_service_account.workload[each.key].unique_id}"
    (doc,) = data_of(mod, "aws_iam_policy_document").values()
    (cond,) = block(doc, "statement")["condition"]
    assert unq(cond["variable"]) == "accounts.google.com:aud"


def test_reference_check_can_fail(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "main.tf").write_text('resource "aws_iam_role" "r" {\n  name = var.missing\n}\n')
    monkeypatch.setattr(__import__(__name__), "TF", tmp_path)
    with pytest.raises(AssertionError, match="var.missing is not declared"):
        test_parses_and_is_consistent("bad")


def test_terraform_fmt(tmp_path):
    terraform = shutil.which("terraform")
    if not terraform:
        pytest.skip("terraform not installed")
    r = subprocess.run([terraform, "fmt", "-check", "-recursive", "-diff", str(TF)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for module in MODULES:  # fmt only looks at *.tfvars
        copy = tmp_path / (module.replace("/", "-") + ".tfvars")
        shutil.copy(TF / module / "terraform.tfvars.example", copy)
        r = subprocess.run([terraform, "fmt", "-check", "-diff", str(copy)], capture_output=True, text=True)
        assert r.returncode == 0, f"{module}: " + r.stdout + r.stderr
