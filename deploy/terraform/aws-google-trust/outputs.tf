output "helm_values" {
  description = "Chart values (YAML): IMDS with the Google token source (gce.* must be set too; on GKE use the cluster's own pool)."
  value = yamlencode({
    imds = {
      enabled     = true
      region      = var.aws_region
      tokenSource = "google"
    }
  })
}

output "service_account_annotations" {
  description = "Annotations to put on each Kubernetes ServiceAccount, keyed by NAMESPACE/NAME."
  value = {
    for k, w in var.workloads : "${w.namespace}/${w.service_account}" => {
      "iam.gke.io/gcp-service-account" = google_service_account.workload[k].email
      "eks.amazonaws.com/role-arn"     = aws_iam_role.workload[k].arn
      "metabridge.io/aws-token-source" = "google"
    }
  }
}

output "google_service_account_unique_ids" {
  description = "Unique id of each Google SA: the accounts.google.com:aud its role trusts."
  value       = { for k, sa in google_service_account.workload : k => sa.unique_id }
}
