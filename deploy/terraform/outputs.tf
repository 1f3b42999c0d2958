output "client_endpoints" {
  description = "Client API address of every node (private IP:port), in node order: n1, n2, ..."
  value       = [for node_id in local.node_ids : "${local.nodes[node_id].private_ip}:${var.client_port}"]
}

output "client_endpoints_csv" {
  description = "The same addresses comma separated, for `chasqui-node status --endpoints` (with `--tls-ca` naming a file holding tls_ca_certificate when client_tls is on)."
  value       = join(",", [for node_id in local.node_ids : "${local.nodes[node_id].private_ip}:${var.client_port}"])
}

output "cluster" {
  description = "The --cluster string every node was started with."
  value       = local.cluster
}

output "nodes" {
  description = "Per node: instance id, zone, private and public address, data volume id."
  value = {
    for node_id in local.node_ids : node_id => {
      instance_id    = aws_instance.node[node_id].id
      zone           = local.zones[local.nodes[node_id].zone_index]
      private_ip     = local.nodes[node_id].private_ip
      public_ip      = aws_instance.node[node_id].public_ip
      data_volume_id = aws_ebs_volume.data[node_id].id
    }
  }
}

output "cluster_secret_parameter" {
  description = "SSM parameter (SecureString) holding the cluster secret."
  value       = aws_ssm_parameter.cluster_secret.name
}

output "admin_key_parameter" {
  description = "SSM parameter (SecureString) holding the bootstrap admin key; read it with `aws ssm get-parameter --with-decryption --name ...`. The key itself is never an output."
  value       = aws_ssm_parameter.admin_key.name
}

output "signup" {
  description = "Who may create users: \"closed\" (only the admin key) or \"open\"."
  value       = var.signup
}

output "tls_ca_certificate" {
  description = "PEM certificate of the cluster CA that signed every node's client-port certificate (null when client_tls is false). Clients trust it: grpc.ssl_channel_credentials(root_certificates=...) or `chasqui-node status --tls-ca FILE`."
  value       = var.client_tls ? tls_self_signed_cert.ca[0].cert_pem : null
}
