variable "project_id" {
  description = "Google Cloud project of the workload identity pool (its id)."
  type        = string
}

variable "pool_id" {
  description = "Id of an existing workload identity pool (output pool_name of ../ ends in workloadIdentityPools/<this>)."
  type        = string
  default     = "metabridge"
}

variable "provider_id" {
  description = "Id of the AWS-type provider to create in the pool (4-32 chars)."
  type        = string
  default     = "aws"

  validation {
    condition     = can(regex("^[a-z0-9-]{4,32}$", var.provider_id)) && !startswith(var.provider_id, "gcp-")
    error_message = "provider_id must be 4-32 lowercase letters, digits or hyphens and must not start with gcp-."
  }
}

variable "aws_account_id" {
  description = "The AWS account (12 digits) whose IAM roles Google trusts."
  type        = string

  validation {
    condition     = can(regex("^[0-9]{12}$", var.aws_account_id))
    error_message = "aws_account_id must be 12 digits."
  }
}

variable "aws_region" {
  description = "AWS region for the aws provider (IAM is global; any enabled region works)."
  type        = string
  default     = "us-east-1"
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::ACCOUNT:oidc-provider/oidc.eks.REGION.amazonaws.com/id/ID), as created for IRSA by eksctl or the console."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+$", var.eks_oidc_provider_arn))
    error_message = "eks_oidc_provider_arn must be an IAM OIDC provider ARN."
  }
}

variable "token_audience" {
  description = "Audience of the Kubernetes token metabridge presents to AWS STS (the role trust policy's :aud condition)."
  type        = string
  default     = "sts.amazonaws.com"
}

variable "workloads" {
  description = <<-EOT
    Kubernetes ServiceAccounts that reach Google through an AWS IAM role, keyed by any name.
      namespace, service_account: the Kubernetes ServiceAccount.
      aws_role_name: IAM role to create; the ServiceAccount assumes it with its
        own token (trust on the EKS issuer, conditioned on :sub and :aud).
      gsa_email: existing Google service account the role may impersonate
        (e.g. from ../ output google_service_account_emails); null = the role
        accesses Google resources directly as principalSet .../attribute.aws_role/ROLE.
  EOT
  type = map(object({
    namespace       = string
    service_account = string
    aws_role_name   = string
    gsa_email       = optional(string)
  }))
}
