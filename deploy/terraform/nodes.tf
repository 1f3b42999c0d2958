# The nodes: one instance per node id, round-robin over the three zones, each with its own
# encrypted gp3 data volume mounted at /var/lib/chasqui. The volume is a separate resource so it
# outlives its instance: replacing an instance reattaches the same journal and LMDB state.

locals {
  # The bootstrap finds the data volume by the NVMe serial that EC2 gives it: the volume id
  # without its dash. The device name in the attachment is only a hint on Nitro instances.
  user_data = {
    for node_id, node in local.nodes : node_id => templatefile("${local.cloud_init}/user-data.yaml.tftpl", {
      node_id    = node_id
      config_dir = local.config_dir
      node_toml_b64 = base64encode(templatefile("${local.cloud_init}/node.toml.tftpl", {
        node_id     = node_id
        config_dir  = local.config_dir
        data_dir    = local.data_dir
        cluster     = local.cluster
        signup      = var.signup
        tls_comment = var.client_tls ? "" : "# "
      }))
      systemd_unit_b64 = base64encode(local.systemd_unit)
      bootstrap_b64 = base64encode(templatefile("${local.cloud_init}/bootstrap.sh.tftpl", {
        node_id             = node_id
        config_dir          = local.config_dir
        data_dir            = local.data_dir
        data_device         = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${replace(aws_ebs_volume.data[node_id].id, "-", "")}"
        install_source      = var.chasqui_source
        python              = var.python
        venv_dir            = local.venv_dir
        secret_parameter    = aws_ssm_parameter.cluster_secret.name
        secret_region       = var.region
        secret_file         = ""
        admin_key_parameter = aws_ssm_parameter.admin_key.name
        admin_key_file      = ""
        tls_ca_parameter    = var.client_tls ? aws_ssm_parameter.tls_ca_cert[0].name : ""
        tls_cert_parameter  = var.client_tls ? aws_ssm_parameter.tls_cert[node_id].name : ""
        tls_key_parameter   = var.client_tls ? aws_ssm_parameter.tls_key[node_id].name : ""
        tls_ca_file         = ""
        tls_cert_file       = ""
        tls_key_file        = ""
        service_mode        = "systemd"
        node_command        = "${local.venv_dir}/bin/chasqui-node"
      }))
    })
  }
}

resource "aws_ebs_volume" "data" {
  for_each = local.nodes

  availability_zone = local.zones[each.value.zone_index]
  type              = "gp3"
  size              = var.data_volume_size_gib
  iops              = var.data_volume_iops
  throughput        = var.data_volume_throughput_mibps
  encrypted         = true
  kms_key_id        = aws_kms_key.main.arn

  tags = { Name = "${var.name}-${each.key}-data", "chasqui:node" = each.key }
}

resource "aws_instance" "node" {
  #checkov:skip=CKV_AWS_88: one subnet per zone and no NAT, so a public address is the node's only egress (dnf, pip, SSM); ingress is still only client_cidrs and the cluster's own group
  for_each = local.nodes

  ami                         = local.ami_id
  instance_type               = var.instance_type
  subnet_id                   = aws_subnet.zone[each.value.zone_index].id
  private_ip                  = each.value.private_ip
  vpc_security_group_ids      = [aws_security_group.node.id]
  iam_instance_profile        = aws_iam_instance_profile.node.name
  associate_public_ip_address = var.public_ip_enabled
  monitoring                  = true
  ebs_optimized               = true
  # Gzipped: cloud-init unpacks it, and the cloud-config (the bootstrap with its TLS steps is
  # most of it) stays far below EC2's 16 KB user-data limit; a test checks the size for 9 nodes.
  user_data_base64 = base64gzip(local.user_data[each.key])

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gib
    encrypted             = true
    kms_key_id            = aws_kms_key.main.arn
    delete_on_termination = true
  }

  tags = { Name = "${var.name}-${each.key}", "chasqui:node" = each.key }

  # A new AMI or a changed member list must not touch running nodes all at once: replace them
  # one at a time with `terraform apply -replace='aws_instance.node["n2"]'` (see deploy/README.md).
  lifecycle {
    ignore_changes = [ami, user_data_base64]
  }

  # The bootstrap reads its parameters at first boot; the role must already allow it.
  depends_on = [aws_iam_role_policy.node]
}

resource "aws_volume_attachment" "data" {
  for_each = local.nodes

  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.data[each.key].id
  instance_id = aws_instance.node[each.key].id

  # Stop the node before detaching so its last writes reach the volume.
  stop_instance_before_detaching = true
}
