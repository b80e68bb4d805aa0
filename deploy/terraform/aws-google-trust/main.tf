# Seed 002 without the credential_process script: a pod's Google service
# account ID token (from metabridge's GCE flow) is shown to AWS STS
# AssumeRoleWithWebIdentity. AWS trusts accounts.google.com out of the box (no
# IAM OIDC provider to create); the role pins the one Google SA whose tokens
# it accepts with accounts.google.com:aud = that SA's unique (numeric) id, as
# seed 002 does (AWS fills :aud from the token's azp claim when present, and
# a Google service account's ID token carries its unique id there).

locals {
  members = {
    for k, w in var.workloads : k => (
      var.workload_identity_pool == null
      ? "serviceAccount:${var.project_id}.svc.id.goog[${w.namespace}/${w.service_account}]"
      : "principal://iam.googleapis.com/${var.workload_identity_pool}/subject/system:serviceaccount:${w.namespace}:${w.service_account}"
    )
  }
  policy_attachments = merge([
    for k, w in var.workloads : {
      for arn in w.policy_arns : "${k}/${arn}" => { workload = k, policy_arn = arn }
    }
  ]...)
}

resource "google_service_account" "workload" {
  for_each     = var.workloads
  project      = var.project_id
  account_id   = each.value.gsa_account_id
  display_name = substr("k8s ${each.value.namespace}/${each.value.service_account} to AWS", 0, 100)
  description  = "ID tokens of this account assume AWS role ${each.value.role_name} (metabridge)"
}

# The Kubernetes ServiceAccount may impersonate (and so mint ID tokens of) the Google SA.
resource "google_service_account_iam_member" "workload_identity_user" {
  for_each           = var.workloads
  service_account_id = google_service_account.workload[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.members[each.key]
}

data "aws_iam_policy_document" "trust" {
  for_each = var.workloads

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = ["accounts.google.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "accounts.google.com:aud"
      values   = [google_service_account.workload[each.key].unique_id]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each             = var.workloads
  name                 = each.value.role_name
  description          = "Assumed with ID tokens of ${google_service_account.workload[each.key].email} (GKE ${each.value.namespace}/${each.value.service_account}, metabridge)"
  assume_role_policy   = data.aws_iam_policy_document.trust[each.key].json
  max_session_duration = 3600
}

resource "aws_iam_role_policy_attachment" "workload" {
  for_each   = local.policy_attachments
  role       = aws_iam_role.workload[each.value.workload].name
  policy_arn = each.value.policy_arn
}
