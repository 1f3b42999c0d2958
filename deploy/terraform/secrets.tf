# One customer-managed KMS key encrypts what the cluster keeps at rest: the data and root
# volumes, the cluster secret, the admin key and the TLS material in SSM Parameter Store, and the
# flow logs.

resource "aws_kms_key" "main" {
  description             = "Chasqui cluster ${var.name}: EBS volumes, SSM parameters, flow logs"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days

  # The account root keeps control of the key (so IAM policies can grant its use, as the node
  # role's does); CloudWatch Logs may use it only for this cluster's flow log group.
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "FlowLogGroupEncrypts"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnEquals = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/${var.name}/vpc-flow-logs"
          }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.main.key_id
}

# The secret that encrypts and authenticates Raft traffic between nodes. It is generated here and
# therefore also stored in the Terraform state: keep the state in an encrypted backend.
resource "random_password" "cluster_secret" {
  length  = 48
  special = false
}

resource "aws_ssm_parameter" "cluster_secret" {
  name        = local.cluster_secret_parameter
  description = "Chasqui cluster ${var.name}: shared Raft secret, read by every node at boot"
  type        = "SecureString"
  key_id      = aws_kms_key.main.arn
  value       = random_password.cluster_secret.result
}

# The bootstrap admin key: the one credential that may create users while signup is closed. Only
# letters and digits (special = false), so it is URL-safe as the node requires, and 48 of them
# (about 285 bits). Like the cluster secret it is also in the Terraform state. Read it with
# `aws ssm get-parameter --with-decryption --name <admin_key_parameter output>`.
resource "random_password" "admin_key" {
  length  = 48
  special = false
}

resource "aws_ssm_parameter" "admin_key" {
  name        = local.admin_key_parameter
  description = "Chasqui cluster ${var.name}: bootstrap admin key, read by every node at boot"
  type        = "SecureString"
  key_id      = aws_kms_key.main.arn
  value       = random_password.admin_key.result
}
