output "client_endpoints" {
  description = "Client API address of every node (private IP:port), in node order: n1, n2, ..."
  value       = [for node_id in local.node_ids : "${local.nodes[node_id].private_ip}:${var.client_port}"]
}

output "client_endpoints_csv" {
  description = "The same addresses comma separated, for `chasqui-node status --endpoints`."
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
