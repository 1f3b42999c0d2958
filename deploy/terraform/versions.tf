# Pinned so that a plan made today means the same next month: the AWS provider's 5.x line is the
# one these resources were written against, the TLS provider's 4.x line makes the client-port
# certificates (tls.tf), and Terraform 1.5 is the oldest with every function used here. Commit the .terraform.lock.hcl that `terraform init` writes next to this file.
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
    tls = {
      source  = "hashicorp/tls"
      version = "~> 4.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ "chasqui:cluster" = var.name }, var.tags)
  }
}
