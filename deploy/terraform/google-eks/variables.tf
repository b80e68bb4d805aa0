variable "project_id" {
  description = "Google Cloud project that holds the workload identity pool and the Google service accounts (its id, e.g. my-project)."
  type        = string
}

variable "pool_id" {
  description = "Id of the workload identity pool to create (4-32 chars: lowercase letters, digits, hyphens)."
  type        = string
  default     = "metabridge"

  validation {
    condition     = can(regex("^[a-z0-9-]{4,32}$", var.pool_id)) && !startswith(var.pool_id, "gcp-")
    error_message = "pool_id must be 4-32 lowercase letters, digits or hyphens and must not start with gcp-."
  }
}

variable "provider_id" {
  description = "Id of the OIDC provider for the EKS cluster inside the pool (4-32 chars), e.g. eks-prod."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9-]{4,32}$", var.provider_id)) && !startswith(var.provider_id, "gcp-")
    error_message = "provider_id must be 4-32 lowercase letters, digits or hyphens and must not start with gcp-."
  }
}

variable "eks_oidc_issuer_url" {
  description = "The EKS cluster's service-account issuer: `aws eks describe-cluster --name C --query cluster.identity.oidc.issuer` (https://oidc.eks.REGION.amazonaws.com/id/ID). Google fetches its discovery document and JWKS, which EKS serves publicly."
  type        = string

  validation {
    condition     = startswith(var.eks_oidc_issuer_url, "https://") && !endswith(var.eks_oidc_issuer_url, "/")
    error_message = "eks_oidc_issuer_url must start with https:// and have no trailing slash (it must equal the tokens' iss claim)."
  }
}

variable "attribute_condition" {
  description = "Optional CEL condition every federated token must satisfy, e.g. \"attribute.namespace in ['ml', 'batch']\". null accepts every ServiceAccount of the cluster (bindings still decide what each may do)."
  type        = string
  default     = null
}

variable "workloads" {
  description = <<-EOT
    Kubernetes ServiceAccounts that get Google access, keyed by any name.
      namespace, service_account: the Kubernetes ServiceAccount.
      gsa_account_id: create this Google service account (6-30 chars) and let the
        ServiceAccount impersonate it (needed for ID tokens); null = direct
        resource access as the federated principal, no Google SA.
      project_roles: roles granted on the project to the Google SA (or, without
        one, to the federated principal).
  EOT
  type = map(object({
    namespace       = string
    service_account = string
    gsa_account_id  = optional(string)
    project_roles   = optional(list(string), [])
  }))
  default = {}
}
