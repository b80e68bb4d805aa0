output "oidc_provider_arn" {
  description = "The IAM OIDC provider that trusts the GKE cluster's issuer."
  value       = local.oidc_provider_arn
}

output "helm_values" {
  description = "Chart values (YAML) for metabridge on this GKE cluster. gce is on with the cluster's built-in pool: metabridge takes 169.254.169.254:80 over from GKE's metadata server for pods, Google paths included."
  value = yamlencode({
    gce = {
      enabled                  = true
      workloadIdentityProvider = "${var.gke_project_id}.svc.id.goog"
      projectId                = var.gke_project_id
      projectNumber            = var.gke_project_number
      clusterIssuer            = local.issuer_url
    }
    imds = {
      enabled     = true
      region      = var.aws_region
      tokenSource = "kubernetes"
    }
    intercept = { preset = "gke" }
    cluster = {
      name     = var.gke_cluster_name
      location = var.gke_location
    }
  })
}

output "service_account_annotations" {
  description = "Annotations to put on each Kubernetes ServiceAccount, keyed by NAMESPACE/NAME."
  value = {
    for k, w in var.workloads : "${w.namespace}/${w.service_account}" => {
      "eks.amazonaws.com/role-arn" = aws_iam_role.workload[k].arn
    }
  }
}
