output "workload_identity_provider" {
  description = "Chart value gce.workloadIdentityProvider for this variant (the AWS-type provider)."
  value       = google_iam_workload_identity_pool_provider.aws.name
}

output "helm_values" {
  description = "Chart values (YAML) for metabridge with the AWS-provider variant."
  value = yamlencode({
    gce = {
      enabled                  = true
      workloadIdentityProvider = google_iam_workload_identity_pool_provider.aws.name
      providerType             = "aws"
      projectId                = var.project_id
    }
    intercept = { preset = "aws-vpc-cni" }
  })
}

output "service_account_annotations" {
  description = "Annotations to put on each Kubernetes ServiceAccount, keyed by NAMESPACE/NAME."
  value = {
    for k, w in var.workloads : "${w.namespace}/${w.service_account}" => merge(
      { "eks.amazonaws.com/role-arn" = aws_iam_role.workload[k].arn },
      w.gsa_email != null ? { "iam.gke.io/gcp-service-account" = w.gsa_email } : {},
    )
  }
}

output "role_principal_sets" {
  description = "The Google principalSet of each role (grant roles to it for direct access without a Google SA)."
  value       = { for k, r in aws_iam_role.workload : k => "principalSet://iam.googleapis.com/${local.pool_name}/attribute.aws_role/${r.name}" }
}
