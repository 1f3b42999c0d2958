# TLS on the client port (var.client_tls): a cluster CA and one certificate per node, made by the
# TLS provider. Each node certificate names the node's fixed private IP, the address that clients
# are given in endpoints and in leader hints. The nodes have no DNS names of their own, so the
# certificates hold none; clients connect by IP and verify against the CA certificate (output
# tls_ca_certificate).
#
# Every private key here (the CA's and each node's) is kept in the Terraform state: keep the
# state in an encrypted backend with restricted access, as for the cluster secret. The CA key
# exists only there; it never reaches a node.

resource "tls_private_key" "ca" {
  count = var.client_tls ? 1 : 0

  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  count = var.client_tls ? 1 : 0

  private_key_pem       = tls_private_key.ca[0].private_key_pem
  is_ca_certificate     = true
  validity_period_hours = var.tls_ca_validity_days * 24
  early_renewal_hours   = 90 * 24
  allowed_uses          = ["cert_signing", "crl_signing", "digital_signature"]

  subject {
    common_name  = "Chasqui ${var.name} client CA"
    organization = "Chasqui"
  }
}

resource "tls_private_key" "node" {
  for_each = var.client_tls ? local.nodes : {}

  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_cert_request" "node" {
  for_each = var.client_tls ? local.nodes : {}

  private_key_pem = tls_private_key.node[each.key].private_key_pem
  ip_addresses    = [each.value.private_ip]

  subject {
    common_name  = "${var.name}-${each.key}"
    organization = "Chasqui"
  }
}

resource "tls_locally_signed_cert" "node" {
  for_each = var.client_tls ? local.nodes : {}

  cert_request_pem      = tls_cert_request.node[each.key].cert_request_pem
  ca_private_key_pem    = tls_private_key.ca[0].private_key_pem
  ca_cert_pem           = tls_self_signed_cert.ca[0].cert_pem
  validity_period_hours = var.tls_cert_validity_days * 24
  early_renewal_hours   = 30 * 24
  allowed_uses          = ["digital_signature", "key_encipherment", "server_auth"]
}

# What a node reads at boot, next to the cluster secret, encrypted with the same key. The
# certificates are public, but SecureString keeps one read path (and one IAM and KMS grant)
# for all of it. All nodes share one instance role, so any node could read any other node's
# key: accepted, since the nodes already share the cluster secret, which lets any one of them
# speak for the cluster on the Raft port.
resource "aws_ssm_parameter" "tls_ca_cert" {
  count = var.client_tls ? 1 : 0

  name        = "${local.tls_parameter_prefix}/ca-cert"
  description = "Chasqui cluster ${var.name}: CA certificate of the client port (PEM)"
  type        = "SecureString"
  key_id      = aws_kms_key.main.arn
  value       = tls_self_signed_cert.ca[0].cert_pem
}

resource "aws_ssm_parameter" "tls_cert" {
  for_each = var.client_tls ? local.nodes : {}

  name        = "${local.tls_parameter_prefix}/${each.key}/cert"
  description = "Chasqui cluster ${var.name}: client-port certificate of node ${each.key} (PEM)"
  type        = "SecureString"
  key_id      = aws_kms_key.main.arn
  value       = tls_locally_signed_cert.node[each.key].cert_pem
}

resource "aws_ssm_parameter" "tls_key" {
  for_each = var.client_tls ? local.nodes : {}

  name        = "${local.tls_parameter_prefix}/${each.key}/key"
  description = "Chasqui cluster ${var.name}: client-port private key of node ${each.key} (PEM)"
  type        = "SecureString"
  key_id      = aws_kms_key.main.arn
  value       = tls_private_key.node[each.key].private_key_pem_pkcs8
}
