# Google side for metabridge on EKS: pods get Google credentials minted from
# their own Kubernetes ServiceAccount token (seed 000, "Kubernetes service
# account federation"), with no key files and no per-pod token mounts.

locals {
  pool_name = google_iam_workload_identity_pool.metabridge.name # projects/NUMBER/locations/global/workloadIdentityPools/POOL

  # What each Kubernetes ServiceAccount is to Google: google.subject = sub.
  principals = {
    for k, w in var.workloads :
    k => "principal://iam.googleapis.com/${local.pool_name}/subject/system:serviceaccount:${w.namespace}:${w.service_account}"
  }

  with_gsa = { for k, w in var.workloads : k => w if w.gsa_account_id != null }

  project_role_grants = merge([
    for k, w in var.workloads : {
      for role in w.project_roles : "${k}/${role}" => {
        role   = role
        member = w.gsa_account_id != null ? "serviceAccount:${google_service_account.workload[k].email}" : local.principals[k]
      }
    }
  ]...)
}

resource "google_iam_workload_identity_pool" "metabridge" {
  project                   = var.project_id
  workload_identity_pool_id = var.pool_id
  display_name              = "metabridge"
  description               = "Kubernetes workloads federated by metabridge"
}

resource "google_iam_workload_identity_pool_provider" "eks" {
  project                            = var.project_id
  workload_identity_pool_id          = google_iam_workload_identity_pool.metabridge.workload_identity_pool_id
  workload_identity_pool_provider_id = var.provider_id
  display_name                       = substr("EKS ${var.provider_id}", 0, 32)
  description                        = "EKS cluster issuer ${var.eks_oidc_issuer_url}"

  # google.subject is system:serviceaccount:NS:SA (<= 127 chars); the
  # attributes allow principalSet bindings and conditions per namespace. No
  # pod attribute: metabridge shares one exchange among a ServiceAccount's pods
  # (chart value cacheKey: identity), so a condition on the pod name would see
  # whichever pod came first (add it only together with cacheKey: pod).
  attribute_mapping = {
    "google.subject"                 = "assertion.sub"
    "attribute.namespace"            = "assertion['kubernetes.io']['namespace']"
    "attribute.service_account_name" = "assertion['kubernetes.io']['serviceaccount']['name']"
  }
  attribute_condition = var.attribute_condition

  oidc {
    issuer_uri = var.eks_oidc_issuer_url
    # No allowed_audiences: the token's aud must then be this provider's own
    # resource name, which is what metabridge requests in its TokenRequest.
  }
}

# Impersonation: one Google SA per workload that asks for it.
resource "google_service_account" "workload" {
  for_each     = local.with_gsa
  project      = var.project_id
  account_id   = each.value.gsa_account_id
  display_name = substr("k8s ${each.value.namespace}/${each.value.service_account}", 0, 100)
  description  = "Impersonated by Kubernetes ServiceAccount ${each.value.namespace}/${each.value.service_account} through metabridge"
}

resource "google_service_account_iam_member" "workload_identity_user" {
  for_each           = local.with_gsa
  service_account_id = google_service_account.workload[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.principals[each.key]
}

resource "google_project_iam_member" "workload" {
  for_each = local.project_role_grants
  project  = var.project_id
  role     = each.value.role
  member   = each.value.member
}
