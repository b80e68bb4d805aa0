variable "aws_region" {
  description = "AWS region pods are told (chart value imds.region) and whose STS endpoint metabridge calls."
  type        = string
}

variable "gke_project_id" {
  description = "Google Cloud project id of the GKE cluster."
  type        = string
}

variable "gke_project_number" {
  description = "Project number of the GKE cluster's project (`gcloud projects describe P --format='value(projectNumber)'`), for the chart's gce values (the cluster's built-in pool)."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+$", var.gke_project_number))
    error_message = "gke_project_number must be digits."
  }
}

variable "gke_location" {
  description = "Region or zone of the GKE cluster (e.g. europe-west1)."
  type        = string
}

variable "gke_cluster_name" {
  description = "Name of the GKE cluster."
  type        = string
}

variable "create_oidc_provider" {
  description = "Create the IAM OIDC provider for the cluster's issuer. false: one exists already in this account (an issuer can be registered only once); its ARN is then derived from the issuer URL."
  type        = bool
  default     = true
}

variable "token_audience" {
  description = "Audience of the Kubernetes token metabridge presents to AWS STS: the OIDC provider's client id and the roles' :aud condition."
  type        = string
  default     = "sts.amazonaws.com"
}

variable "workloads" {
  description = <<-EOT
    Kubernetes ServiceAccounts that get an AWS role, keyed by any name.
      namespace, service_account: the Kubernetes ServiceAccount (the trust
        policy's :sub is system:serviceaccount:NAMESPACE:NAME).
      role_name: IAM role to create.
      policy_arns: managed policies to attach to it.
      max_session_duration: seconds (3600-43200); sessions of an hour or more
        keep SDKs out of their refresh-on-every-call window.
  EOT
  type = map(object({
    namespace            = string
    service_account      = string
    role_name            = string
    policy_arns          = optional(list(string), [])
    max_session_duration = optional(number, 3600)
  }))
  default = {}
}
