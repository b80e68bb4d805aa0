# AWS side for metabridge on GKE (token source "kubernetes"): AWS trusts the
# GKE cluster's service-account issuer, exactly like IRSA trusts an EKS one.
# metabridge requests a token for the pod's ServiceAccount with audience
# var.token_audience, bound to the pod, and calls AssumeRoleWithWebIdentity
# with it; the role's trust policy decides on :sub and :aud.
#
# AWS must be able to fetch the issuer's discovery document and JWKS
# (GKE serves them at the issuer URL).

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  issuer_url      = "https://container.googleapis.com/v1/projects/${var.gke_project_id}/locations/${var.gke_location}/clusters/${var.gke_cluster_name}"
  issuer_hostpath = trimprefix(local.issuer_url, "https://")
  oidc_provider_arn = (
    var.create_oidc_provider
    ? aws_iam_openid_connect_provider.gke[0].arn
    : "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:oidc-provider/${local.issuer_hostpath}"
  )
  policy_attachments = merge([
    for k, w in var.workloads : {
      for arn in w.policy_arns : "${k}/${arn}" => { workload = k, policy_arn = arn }
    }
  ]...)
}

resource "aws_iam_openid_connect_provider" "gke" {
  count          = var.create_oidc_provider ? 1 : 0
  url            = local.issuer_url
  client_id_list = [var.token_audience]
}

data "aws_iam_policy_document" "trust" {
  for_each = var.workloads

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [local.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.issuer_hostpath}:sub"
      values   = ["system:serviceaccount:${each.value.namespace}:${each.value.service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.issuer_hostpath}:aud"
      values   = [var.token_audience]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each             = var.workloads
  name                 = each.value.role_name
  description          = "Assumed by GKE ${var.gke_cluster_name} ${each.value.namespace}/${each.value.service_account} through metabridge"
  assume_role_policy   = data.aws_iam_policy_document.trust[each.key].json
  max_session_duration = each.value.max_session_duration
}

resource "aws_iam_role_policy_attachment" "workload" {
  for_each   = local.policy_attachments
  role       = aws_iam_role.workload[each.value.workload].name
  policy_arn = each.value.policy_arn
}
