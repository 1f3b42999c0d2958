# Least privilege: a node may read the SSM parameters its bootstrap reads (the cluster secret,
# the admin key and, with client_tls, the CA certificate and the nodes' certificates and keys)
# and decrypt them through SSM with the cluster key, nothing else. The nodes share this one role,
# so each may read every node's TLS key, not only its own (see tls.tf for why that is accepted). Logs stay in the journal on the node; nothing is shipped to
# CloudWatch, so no logs permission is granted.

data "aws_iam_policy_document" "node_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${var.name}-node"
  description        = "Chasqui node: read the cluster secret, admin key and TLS parameters"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
}

data "aws_iam_policy_document" "node" {
  statement {
    sid       = "ReadNodeParameters"
    actions   = ["ssm:GetParameter"]
    resources = local.node_parameter_arns
  }

  statement {
    sid       = "DecryptNodeParametersThroughSsm"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ssm.${var.region}.amazonaws.com"]
    }
  }
}

locals {
  # Exactly the parameters a bootstrap reads; no wildcard, so a parameter added later under the
  # same path is not readable by the nodes until it is listed here.
  node_parameter_arns = concat(
    [aws_ssm_parameter.cluster_secret.arn, aws_ssm_parameter.admin_key.arn],
    aws_ssm_parameter.tls_ca_cert[*].arn,
    [for node_id in local.node_ids : aws_ssm_parameter.tls_cert[node_id].arn if var.client_tls],
    [for node_id in local.node_ids : aws_ssm_parameter.tls_key[node_id].arn if var.client_tls],
  )
}

resource "aws_iam_role_policy" "node" {
  name   = "read-node-parameters"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.node.json
}

resource "aws_iam_role_policy_attachment" "session_manager" {
  count = var.session_manager_enabled ? 1 : 0

  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}

# VPC flow logs write to their one log group.
data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  name               = "${var.name}-flow-logs"
  description        = "VPC flow logs of Chasqui cluster ${var.name}"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogGroups",
      "logs:DescribeLogStreams",
    ]
    resources = [aws_cloudwatch_log_group.flow_logs.arn, "${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}
