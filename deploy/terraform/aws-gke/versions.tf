terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.81 made aws_iam_openid_connect_provider.thumbprint_list optional (IAM
      # verifies well-known issuers against its trusted CAs).
      version = ">= 5.81"
    }
  }
}

provider "aws" {
  region = var.aws_region
}
