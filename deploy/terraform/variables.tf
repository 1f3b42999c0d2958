# Inputs of the Chasqui cluster. Region, zones, `client_cidrs` and `chasqui_source` have no
# default: where the brokers run, who may reach them and which release they run are decisions.

variable "region" {
  description = "AWS region to deploy into, e.g. \"eu-west-1\". It needs at least three availability zones."
  type        = string
}

variable "name" {
  description = "Name prefix for every resource and the value of the chasqui:cluster tag."
  type        = string
  default     = "chasqui"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name must be 2 to 31 characters of lower-case letters, digits and dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

variable "availability_zones" {
  description = "Exactly three availability zones of the region, one subnet each, e.g. [\"eu-west-1a\", \"eu-west-1b\", \"eu-west-1c\"]. Named explicitly, never looked up: a looked-up list can change (a new or impaired zone) and would move subnets, and with them every node."
  type        = list(string)

  validation {
    condition     = length(toset(var.availability_zones)) == 3 && length(var.availability_zones) == 3
    error_message = "availability_zones must name exactly three distinct zones."
  }
}

variable "vpc_cidr" {
  description = "Address range of the VPC; zone i gets the /24 at cidrsubnet(vpc_cidr, 24 - prefix, i)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) <= 22, false)
    error_message = "vpc_cidr must be a valid IPv4 range of /22 or larger, to hold three /24 subnets."
  }
}

variable "node_count" {
  description = "Number of Chasqui nodes: odd, so that a majority survives the loss of one zone; 3 or 5 (at most 9). Nodes are spread round-robin over the three zones: n1, n4, n7 in the first, and so on."
  type        = number
  default     = 3

  validation {
    condition     = var.node_count >= 3 && var.node_count <= 9 && var.node_count % 2 == 1 && floor(var.node_count) == var.node_count
    error_message = "node_count must be an odd whole number from 3 to 9: an even count adds a node without adding fault tolerance."
  }
}

variable "instance_type" {
  description = "EC2 instance type of every node. It must be a Nitro type: the bootstrap finds the data volume by its NVMe id."
  type        = string
  default     = "m6i.large"

  validation {
    condition     = !can(regex("^(t1|t2|m1|m2|m3|m4|c1|c3|c4|r3|r4|x1|x1e|d2|i2|i3|g3|p2|p3|f1|h1)\\.", var.instance_type))
    error_message = "instance_type must be a Nitro instance type (for example m6i.large, t3.medium, c7g.large with an arm64 AMI)."
  }
}

variable "ami_id" {
  description = "AMI for the nodes; null uses the latest Amazon Linux 2023 for x86_64 (which ships the AWS CLI the bootstrap uses to read the cluster secret). Existing nodes keep their AMI until replaced one at a time."
  type        = string
  default     = null
}

variable "chasqui_source" {
  description = "What `pip install` installs on every node: a pinned release (\"chasqui==0.1.0\") or a git ref (\"git+https://github.com/OWNER/chasqui.git@v0.1.0\"). Unpinned sources are rejected, so that every node runs the same code."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+$", var.chasqui_source)) || can(regex("^git\\+https://[^@\\s']+@[A-Za-z0-9._/-]+$", var.chasqui_source))
    error_message = "chasqui_source must be \"chasqui==VERSION\" or \"git+https://HOST/PATH.git@REF\" (a tag or commit)."
  }
}

variable "python" {
  description = "Python interpreter package installed with dnf and used for the node's virtualenv (Chasqui needs 3.11 or later)."
  type        = string
  default     = "python3.11"

  validation {
    condition     = can(regex("^python3\\.(1[1-9])$", var.python))
    error_message = "python must be python3.11 or later, e.g. \"python3.12\"."
  }
}

variable "client_port" {
  description = "TCP port of the gRPC client API on every node."
  type        = number
  default     = 7100
}

variable "raft_port" {
  description = "TCP port of Raft traffic between nodes; open only within the cluster's security group."
  type        = number
  default     = 7200
}

variable "client_cidrs" {
  description = "IPv4 ranges allowed to reach the client port, e.g. the application subnets or a VPN range. Clients follow leader hints that name private addresses, so they must route into the VPC (peering, VPN, Transit Gateway)."
  type        = list(string)

  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for cidr in var.client_cidrs : can(cidrhost(cidr, 0)) && cidr != "0.0.0.0/0"])
    error_message = "client_cidrs must list at least one valid IPv4 range, and never 0.0.0.0/0."
  }
}

variable "public_ip_enabled" {
  description = "Give each node a public address for egress (dnf, pip, git, SSM) through the internet gateway. Ingress is still limited by the security group. Set false only if the VPC gets another way out that this module does not create."
  type        = bool
  default     = true
}

variable "root_volume_size_gib" {
  description = "Size of each node's root volume (operating system and the Chasqui virtualenv)."
  type        = number
  default     = 20
}

variable "data_volume_size_gib" {
  description = "Size of each node's separate data volume, mounted at /var/lib/chasqui (Raft journal, snapshots, LMDB)."
  type        = number
  default     = 50

  validation {
    condition     = var.data_volume_size_gib >= 8 && var.data_volume_size_gib <= 16384
    error_message = "data_volume_size_gib must be between 8 and 16384."
  }
}

variable "data_volume_iops" {
  description = "Provisioned IOPS of each gp3 data volume (3000 is included in the gp3 price). Every confirmed publish waits for an fsync here."
  type        = number
  default     = 3000
}

variable "data_volume_throughput_mibps" {
  description = "Provisioned throughput of each gp3 data volume in MiB/s (125 is included in the gp3 price)."
  type        = number
  default     = 125
}

variable "session_manager_enabled" {
  description = "Attach AmazonSSMManagedInstanceCore so operators can open shells with SSM Session Manager instead of SSH. Off by default: the node itself needs only its one parameter."
  type        = bool
  default     = false
}

variable "flow_log_retention_days" {
  description = "Days to keep the VPC flow logs in CloudWatch."
  type        = number
  default     = 365
}

variable "kms_deletion_window_days" {
  description = "Waiting period before the cluster's KMS key is deleted after `terraform destroy`; the data volumes cannot be read without the key."
  type        = number
  default     = 30
}

variable "signup" {
  description = "Who may create users: \"closed\" (only the admin key, from the SSM parameter in the admin_key_parameter output) or \"open\" (any client that reaches the client port). Every node gets the same value."
  type        = string
  default     = "closed"

  validation {
    condition     = contains(["open", "closed"], var.signup)
    error_message = "signup must be \"open\" or \"closed\"."
  }
}

variable "client_tls" {
  description = "Serve the client port over TLS with certificates made here: a cluster CA (its certificate is the tls_ca_certificate output, for clients to trust) and one certificate per node for its private IP. The private keys are kept in the Terraform state and in SSM SecureString parameters. Set false only where the client traffic is protected some other way."
  type        = bool
  default     = true
}

variable "tls_cert_validity_days" {
  description = "Validity of each node's client-port certificate. Terraform replaces a certificate at the first apply within 30 days of its expiry; a node picks the new one up when its bootstrap runs again (see deploy/README.md)."
  type        = number
  default     = 365

  validation {
    condition     = var.tls_cert_validity_days >= 60 && var.tls_cert_validity_days <= 825
    error_message = "tls_cert_validity_days must be between 60 and 825."
  }
}

variable "tls_ca_validity_days" {
  description = "Validity of the cluster CA certificate that clients trust. When it is replaced every client needs the new tls_ca_certificate output, so it outlives many node certificates."
  type        = number
  default     = 3650

  validation {
    condition     = var.tls_ca_validity_days >= 365 && var.tls_ca_validity_days <= 7300
    error_message = "tls_ca_validity_days must be between 365 and 7300."
  }
}
