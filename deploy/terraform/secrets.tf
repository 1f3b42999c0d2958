# One customer-managed KMS key encrypts what the cluster keeps at rest: the data and root
# volumes, the cluster secret in SSM Parameter Store, and the flow logs.

resource "aws_kms_key" "main" {
  description             = "Chasqui cluster ${var.name}: EBS volumes, cluster secret, flow logs"
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
