# The AWS-provider variant of seed 000 ("IAM role federation"), run after
# ../ created the pool. Google trusts the AWS account; each pod's
# ServiceAccount assumes an IAM role with its own Kubernetes token (as IRSA
# does), and metabridge presents that role's signed GetCallerIdentity to
# Google STS. Google bindings name the role, not the Kubernetes ServiceAccount.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  pool_name           = "projects/${data.google_project.this.number}/locations/global/workloadIdentityPools/${var.pool_id}"
  eks_issuer_hostpath = regex("oidc-provider/(.*)$", var.eks_oidc_provider_arn)[0]
  with_gsa            = { for k, w in var.workloads : k => w if w.gsa_email != null }
}

resource "google_iam_workload_identity_pool_provider" "aws" {
  project                            = var.project_id
  workload_identity_pool_id          = var.pool_id
  workload_identity_pool_provider_id = var.provider_id
  display_name                       = substr("AWS ${var.aws_account_id}", 0, 32)
  description                        = "AWS account ${var.aws_account_id} (roles assumed by Kubernetes pods via metabridge)"

  attribute_mapping = {
    "google.subject"        = "assertion.arn"
    "attribute.aws_account" = "assertion.account"
    "attribute.aws_role"    = "assertion.arn.extract('assumed-role/{role}/')"
  }

  aws {
    account_id = var.aws_account_id
  }
}

data "aws_iam_policy_document" "trust" {
  for_each = var.workloads

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.eks_issuer_hostpath}:sub"
      values   = ["system:serviceaccount:${each.value.namespace}:${each.value.service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.eks_issuer_hostpath}:aud"
      values   = [var.token_audience]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each             = var.workloads
  name                 = each.value.aws_role_name
  description          = "Assumed by ${each.value.namespace}/${each.value.service_account}; federated to Google by metabridge"
  assume_role_policy   = data.aws_iam_policy_document.trust[each.key].json
  max_session_duration = 3600
}

# Any session of the role may act as the workload's Google SA.
resource "google_service_account_iam_member" "workload_identity_user" {
  for_each           = local.with_gsa
  service_account_id = "projects/${var.project_id}/serviceAccounts/${each.value.gsa_email}"
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${local.pool_name}/attribute.aws_role/${aws_iam_role.workload[each.key].name}"
}
