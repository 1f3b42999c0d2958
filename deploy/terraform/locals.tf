# Everything a node needs to know about its peers is computed here, before any instance exists:
# node i lives in zone i % 3 at a fixed private address, so the `--cluster` string can be written
# into every node's configuration at boot, with no discovery step and no dependency cycle.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_ssm_parameter" "al2023_ami" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

locals {
  zones        = var.availability_zones
  subnet_cidrs = [for zone_index in range(3) : cidrsubnet(var.vpc_cidr, 24 - tonumber(split("/", var.vpc_cidr)[1]), zone_index)]

  # Host addresses start at .10: AWS reserves .0-.3 and .255 in every subnet.
  nodes = {
    for index in range(var.node_count) : "n${index + 1}" => {
      zone_index = index % 3,
      private_ip = cidrhost(local.subnet_cidrs[index % 3], 10 + floor(index / 3))
    }
  }
  node_ids = [for index in range(var.node_count) : "n${index + 1}"]

  cluster = join(",", [
    for node_id in local.node_ids :
    "${node_id}=${local.nodes[node_id].private_ip}:${var.client_port}/${local.nodes[node_id].private_ip}:${var.raft_port}"
  ])

  ami_id                   = coalesce(var.ami_id, nonsensitive(data.aws_ssm_parameter.al2023_ami.value))
  account_id               = data.aws_caller_identity.current.account_id
  partition                = data.aws_partition.current.partition
  cluster_secret_parameter = "/${var.name}/cluster-secret"
  admin_key_parameter      = "/${var.name}/admin-key"
  tls_parameter_prefix     = "/${var.name}/tls"

  # Paths on the node; the systemd unit in deploy/systemd names the same ones.
  config_dir   = "/etc/chasqui"
  data_dir     = "/var/lib/chasqui"
  venv_dir     = "/opt/chasqui/.venv"
  cloud_init   = "${path.module}/../cloud-init"
  systemd_unit = file("${path.module}/../systemd/chasqui-node.service")
}
