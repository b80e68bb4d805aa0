"""One workload trusted by both fake clouds: a Google workload identity pool
provider for the fake cluster's issuer with a Google SA granted to the
workload's ServiceAccount, and an AWS role trusting the issuer on `sub`.

    w = trust_workload(fake_kube, fake_google, fake_aws, "shop", "app")
    pod = testbed.add_pod("app-1", "shop", "app", w.annotations)
    mb = testbed.start_metabridge(*w.metabridge_args)
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECT_NUMBER = "271828182845"
PROJECT_ID = "bridge-project"
POOL, PROVIDER = "eks-pool", "eks-oidc"


@dataclass
class Workload:
    gsa: str
    role_arn: str
    annotations: dict
    metabridge_args: list


def trust_workload(fake_kube, fake_google, fake_aws, namespace: str, sa: str) -> Workload:
    issuer_host = fake_kube.issuer.split("://", 1)[1]
    provider = fake_google.add_oidc_provider(PROJECT_NUMBER, POOL, PROVIDER, fake_kube.issuer)
    gsa = f"{sa}@{PROJECT_ID}.iam.gserviceaccount.com"
    fake_google.add_service_account(gsa)
    fake_google.grant_workload_identity_user(
        gsa, f"principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/"
             f"workloadIdentityPools/{POOL}/subject/system:serviceaccount:{namespace}:{sa}")
    fake_aws.add_oidc_provider(fake_kube.issuer, ["sts.amazonaws.com"])
    role = fake_aws.add_role(sa, provider=issuer_host,
                             conditions={f"{issuer_host}:sub": f"system:serviceaccount:{namespace}:{sa}"})
    return Workload(
        gsa=gsa,
        role_arn=role,
        annotations={"iam.gke.io/gcp-service-account": gsa, "eks.amazonaws.com/role-arn": role},
        metabridge_args=[
            "--gcp-workload-identity-provider", provider, "--gcp-project-id", PROJECT_ID,
            "--gcp-sts-url", fake_google.url, "--gcp-iamcredentials-url", fake_google.url,
            "--aws-region", "us-east-1", "--aws-sts-url", fake_aws.url,
        ],
    )
