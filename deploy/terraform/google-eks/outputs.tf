output "workload_identity_provider" {
  description = "Chart value gce.workloadIdentityProvider (OIDC provider for the EKS issuer)."
  value       = google_iam_workload_identity_pool_provider.eks.name
}

output "pool_name" {
  description = "The pool's resource name (projects/NUMBER/locations/global/workloadIdentityPools/POOL), input of the aws-provider variant."
  value       = google_iam_workload_identity_pool.metabridge.name
}

output "google_service_account_emails" {
  description = "Email of each workload's Google service account (workloads with gsa_account_id), keyed like var.workloads."
  value       = { for k, sa in google_service_account.workload : k => sa.email }
}

output "helm_values" {
  description = "Chart values (YAML) for metabridge on this EKS cluster: helm install ... -f <(terraform output -raw helm_values)."
  value = yamlencode({
    gce = {
      enabled                  = true
      workloadIdentityProvider = google_iam_workload_identity_pool_provider.eks.name
      projectId                = var.project_id
    }
    intercept = { preset = "aws-vpc-cni" }
    dns       = { coreDNS = { enabled = true } }
  })
}

output "principals" {
  description = "The Google principal of each workload's Kubernetes ServiceAccount (grant roles to it for direct access)."
  value       = local.principals
}

output "service_account_annotations" {
  description = "Annotations to put on each Kubernetes ServiceAccount, keyed by NAMESPACE/NAME."
  value = {
    for k, w in var.workloads : "${w.namespace}/${w.service_account}" => (
      w.gsa_account_id != null ? { "iam.gke.io/gcp-service-account" = google_service_account.workload[k].email } : {}
    )
  }
}
