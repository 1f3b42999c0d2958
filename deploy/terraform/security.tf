# The nodes' one security group: clients reach the client port only from `client_cidrs`; the Raft
# port is reachable only from members of this same group; egress is HTTPS (dnf, pip, git, SSM,
# KMS) plus the cluster's own ports. DNS, NTP and instance metadata go to link-local addresses
# that security groups do not filter.

resource "aws_security_group" "node" {
  name        = "${var.name}-node"
  description = "Chasqui nodes: client port from client_cidrs, Raft port within the cluster"
  vpc_id      = aws_vpc.main.id

  ingress {
    description = "Chasqui client API from the configured client ranges"
    from_port   = var.client_port
    to_port     = var.client_port
    protocol    = "tcp"
    cidr_blocks = var.client_cidrs
  }

  ingress {
    description = "Chasqui client API from other nodes (chasqui-node status, members)"
    from_port   = var.client_port
    to_port     = var.client_port
    protocol    = "tcp"
    self        = true
  }

  ingress {
    description = "Raft between the nodes of this cluster only"
    from_port   = var.raft_port
    to_port     = var.raft_port
    protocol    = "tcp"
    self        = true
  }

  egress {
    description = "Raft to the other nodes"
    from_port   = var.raft_port
    to_port     = var.raft_port
    protocol    = "tcp"
    self        = true
  }

  egress {
    description = "Client API of the other nodes"
    from_port   = var.client_port
    to_port     = var.client_port
    protocol    = "tcp"
    self        = true
  }

  egress {
    description = "HTTPS for dnf, pip, git and the SSM and KMS APIs"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  tags = { Name = "${var.name}-node" }

  lifecycle {
    create_before_destroy = true
  }
}
