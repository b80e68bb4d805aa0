variable "project_id" {
  description = "Google Cloud project that holds the Google service accounts (on GKE: the cluster's project)."
  type        = string
}

variable "aws_region" {
  description = "AWS region pods are told (chart value imds.region) and whose STS endpoint metabridge calls."
  type        = string
}

variable "workload_identity_pool" {
  description = "Which Kubernetes identities may impersonate the Google SAs. null (GKE): the cluster's built-in pool PROJECT.svc.id.goog, member serviceAccount:PROJECT.svc.id.goog[NS/SA]. Otherwise a pool resource name (projects/NUMBER/locations/global/workloadIdentityPools/POOL, e.g. output pool_name of ../google-eks), member principal://.../subject/system:serviceaccount:NS:SA."
  type        = string
  default     = null

  validation {
    condition     = var.workload_identity_pool == null || can(regex("^projects/[0-9]+/locations/global/workloadIdentityPools/[^/]+$", var.workload_identity_pool))
    error_message = "workload_identity_pool must be null or projects/NUMBER/locations/global/workloadIdentityPools/POOL."
  }
}

variable "workloads" {
  description = <<-EOT
    Kubernetes ServiceAccounts that reach AWS with their Google SA's ID token, keyed by any name.
      namespace, service_account: the Kubernetes ServiceAccount.
      gsa_account_id: Google service account to create (6-30 chars); the
        ServiceAccount impersonates it, metabridge asks it for an ID token.
      role_name: IAM role to create, trusting accounts.google.com for exactly
        that Google SA (accounts.google.com:aud = its unique id).
      policy_arns: managed policies to attach to the role.
  EOT
  type = map(object({
    namespace       = string
    service_account = string
    gsa_account_id  = string
    role_name       = string
    policy_arns     = optional(list(string), [])
  }))
  default = {}
}
