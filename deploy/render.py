#!/usr/bin/env python3
"""Render one Chasqui node's bootstrap from `deploy/cloud-init/`, the templates Terraform renders.

Terraform passes these templates to `templatefile()` for every EC2 node; this script renders the
same files for given node id and addresses, so that the bootstrap can be read, diffed and run on
a laptop or in a test:

    python deploy/render.py --node-id n1 --addresses 10.40.0.10,10.40.1.10,10.40.2.10 --out out/
    python deploy/render.py --local --node-id n1 --cluster n1=127.0.0.1:7101/127.0.0.1:7201,... \\
        --secret-file secret --admin-key-file admin.key --tls-dir tls/n1 --data-dir var/n1 \\
        --out out/n1 && bash out/n1/bootstrap.sh

It writes `node.toml`, `bootstrap.sh` and `user-data.yaml` (the cloud-config with all three files
embedded). Without `--local` the values are those Terraform uses on EC2 (SSM parameters, data
volume, pip install, systemd). With `--local` the install, volume and systemd steps are switched
off, the cluster secret and the admin key come from `--secret-file` and `--admin-key-file`, the
client-port TLS files from `--tls-dir` (`ca.crt`, `node.crt`, `node.key`, as `chasqui-node dev
--tls` writes them; without it the port is plaintext), and running `bootstrap.sh` becomes the
node in the foreground (`python -m chasqui_node.cli start --config node.toml`), so its PID is the
node's PID. Signup is closed unless `--signup open`; closed signup needs an admin key.

Only the template syntax the templates use is supported: `${name}`, and the escapes `$${` and
`%%{`. Anything else (functions, directives) is an error rather than a silent difference from
Terraform; a test renders the same templates with `terraform console` and compares bytes.
"""

from __future__ import annotations

import argparse
import base64
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = DEPLOY_DIR / "cloud-init"
SYSTEMD_UNIT_PATH = DEPLOY_DIR / "systemd" / "chasqui-node.service"

# The defaults of deploy/terraform (variables.tf and locals.tf); a test keeps them in step.
CLIENT_PORT_DEFAULT = 7100
RAFT_PORT_DEFAULT = 7200
CONFIG_DIR_DEFAULT = "/etc/chasqui"
DATA_DIR_DEFAULT = "/var/lib/chasqui"
VENV_DIR_DEFAULT = "/opt/chasqui/.venv"
PYTHON_DEFAULT = "python3.11"

SIGNUP_DEFAULT = "closed"
TLS_FILE_NAMES = ("ca.crt", "node.crt", "node.key")  # in --tls-dir, as chasqui_node.tls writes

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_TEMPLATE_TOKEN = re.compile(r"\$\$\{|%%\{|%\{|\$\{([^}]*)\}")


class RenderError(ValueError):
    """A template uses syntax this renderer does not support, or a value cannot be embedded."""


@dataclass(frozen=True)
class NodeBootstrap:
    """Everything the templates need for one node. Field names are the template variables."""

    node_id: str
    cluster: str
    config_dir: str = CONFIG_DIR_DEFAULT
    data_dir: str = DATA_DIR_DEFAULT
    data_device: str = ""
    install_source: str = ""
    python: str = PYTHON_DEFAULT
    venv_dir: str = VENV_DIR_DEFAULT
    secret_parameter: str = ""
    secret_region: str = ""
    secret_file: str = ""
    admin_key_parameter: str = ""
    admin_key_file: str = ""
    tls_ca_parameter: str = ""
    tls_cert_parameter: str = ""
    tls_key_parameter: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    service_mode: str = "systemd"
    node_command: str = f"{VENV_DIR_DEFAULT}/bin/chasqui-node"
    signup: str = SIGNUP_DEFAULT  # node.toml only, like `cluster`

    @property
    def client_tls(self) -> bool:
        """Whether the client port serves TLS: the bootstrap writes tls/ and node.toml names it."""
        return bool(self.tls_key_parameter or self.tls_key_file)

    def check(self) -> None:
        """Raise RenderError for a value the bootstrap could not carry safely."""
        if not NODE_ID_PATTERN.match(self.node_id):
            raise RenderError(f"node id {self.node_id!r} must be letters, digits, '-' or '_'")
        if self.node_id not in member_ids(self.cluster):
            raise RenderError(f"node {self.node_id} is not a member of the cluster {self.cluster}")
        if self.service_mode not in ("systemd", "exec"):
            raise RenderError(f"service mode {self.service_mode!r} is not systemd or exec")
        if not (self.secret_parameter or self.secret_file):
            raise RenderError("give a secret parameter (SSM) or a secret file")
        if self.signup not in ("open", "closed"):
            raise RenderError(f"signup {self.signup!r} is not open or closed")
        if self.signup == "closed" and not (self.admin_key_parameter or self.admin_key_file):
            raise RenderError(
                "signup is closed, so only an admin key can create users: give an admin key "
                "parameter (SSM) or file"
            )
        for kind in ("parameter", "file"):
            given = [bool(getattr(self, f"tls_{part}_{kind}")) for part in ("ca", "cert", "key")]
            if any(given) and not all(given):
                raise RenderError(f"give all three TLS {kind}s (CA, certificate, key) or none")
        for name, value in asdict(self).items():
            # Values sit between single quotes in bootstrap.sh and between double quotes in
            # node.toml; node_command is embedded as shell words, already quoted.
            forbidden = '\n\r"\\' if name == "node_command" else "'\n\r\"\\"
            if any(character in value for character in forbidden):
                raise RenderError(f"{name} {value!r} contains a quote, backslash or newline")


def member_ids(cluster: str) -> list[str]:
    return [part.partition("=")[0].strip() for part in cluster.split(",") if part.strip()]


def cluster_string(
    addresses: Sequence[str],
    client_port: int = CLIENT_PORT_DEFAULT,
    raft_port: int = RAFT_PORT_DEFAULT,
) -> str:
    """`n1=A:client/A:raft,n2=...` for nodes n1..nN at `addresses`, as Terraform builds it."""
    return ",".join(
        f"n{index}={address}:{client_port}/{address}:{raft_port}"
        for index, address in enumerate(addresses, start=1)
    )


def render_template(text: str, variables: Mapping[str, str]) -> str:
    """Render `text` as Terraform's templatefile() would, for plain `${name}` interpolations."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        if token == "%%{":
            return "%{"
        if token == "%{":
            raise RenderError("template directives (%{ ... }) are not supported")
        name = match.group(1).strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RenderError(f"only plain variables are supported, not ${{{name}}}")
        if name not in variables:
            raise RenderError(f"the template uses ${{{name}}}, which was not given")
        return variables[name]

    return _TEMPLATE_TOKEN.sub(substitute, text)


def _template(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def render_node(settings: NodeBootstrap) -> dict[str, str]:
    """The node's files by name: node.toml, bootstrap.sh and user-data.yaml (cloud-config)."""
    settings.check()
    node_toml = render_template(_template("node.toml.tftpl"), node_toml_variables(settings))
    bootstrap = render_template(_template("bootstrap.sh.tftpl"), bootstrap_variables(settings))
    user_data = render_template(
        _template("user-data.yaml.tftpl"),
        {
            "node_id": settings.node_id,
            "config_dir": settings.config_dir,
            "node_toml_b64": _base64(node_toml),
            "systemd_unit_b64": _base64(SYSTEMD_UNIT_PATH.read_text()),
            "bootstrap_b64": _base64(bootstrap),
        },
    )
    return {"node.toml": node_toml, "bootstrap.sh": bootstrap, "user-data.yaml": user_data}


def node_toml_variables(settings: NodeBootstrap) -> dict[str, str]:
    """What node.toml.tftpl is given (Terraform passes the same in nodes.tf). `tls_comment`
    turns the tls_cert and tls_key lines into comments when the client port is plaintext."""
    return {
        "node_id": settings.node_id,
        "config_dir": settings.config_dir,
        "data_dir": settings.data_dir,
        "cluster": settings.cluster,
        "signup": settings.signup,
        "tls_comment": "" if settings.client_tls else "# ",
    }


def bootstrap_variables(settings: NodeBootstrap) -> dict[str, str]:
    """What bootstrap.sh.tftpl is given: every field except those only node.toml uses."""
    values = asdict(settings)
    del values["cluster"], values["signup"]
    return values


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def local_settings(
    node_id: str,
    cluster: str,
    *,
    config_dir: Path,
    data_dir: Path,
    secret_file: Path,
    admin_key_file: Path | None = None,
    tls_dir: Path | None = None,
    signup: str = SIGNUP_DEFAULT,
    python: str = sys.executable,
) -> NodeBootstrap:
    """A bootstrap that runs here: no install, no data volume, no systemd; the cluster secret,
    the admin key and the TLS files (`tls_dir`/ca.crt, node.crt, node.key) from files.

    `config_dir` must be where node.toml is written (cloud-init's job on EC2; `write_node`'s
    here). The node runs from whatever `python` can import, e.g. with PYTHONPATH at the repo.
    """
    tls_files = [str(tls_dir / name) if tls_dir else "" for name in TLS_FILE_NAMES]
    return NodeBootstrap(
        node_id=node_id,
        cluster=cluster,
        config_dir=str(config_dir),
        data_dir=str(data_dir),
        python=python,
        secret_file=str(secret_file),
        admin_key_file=str(admin_key_file) if admin_key_file else "",
        tls_ca_file=tls_files[0],
        tls_cert_file=tls_files[1],
        tls_key_file=tls_files[2],
        signup=signup,
        service_mode="exec",
        node_command=shlex.join([python, "-m", "chasqui_node.cli"]),
    )


def write_node(settings: NodeBootstrap, out_dir: Path) -> dict[str, Path]:
    """Render and write the node's files into `out_dir`; bootstrap.sh is made executable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, text in render_node(settings).items():
        path = out_dir / name
        path.write_text(text)
        path.chmod(0o700 if name == "bootstrap.sh" else 0o644)
        written[name] = path
    return written


def main(arguments: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-id", required=True, help="This node's id, e.g. n1.")
    members = parser.add_mutually_exclusive_group(required=True)
    members.add_argument("--cluster", help="The full member list, ID=CLIENT/RAFT,...")
    members.add_argument(
        "--addresses", help="Comma-separated node addresses, n1 first; ports from --*-port."
    )
    parser.add_argument("--client-port", type=int, default=CLIENT_PORT_DEFAULT)
    parser.add_argument("--raft-port", type=int, default=RAFT_PORT_DEFAULT)
    parser.add_argument("--out", type=Path, required=True, help="Directory for the files.")
    parser.add_argument("--local", action="store_true", help="Render a bootstrap that runs here.")
    parser.add_argument("--data-dir", help="Data directory (--local: required).")
    parser.add_argument("--secret-file", type=Path, help="Cluster secret file (--local).")
    parser.add_argument("--admin-key-file", type=Path, help="Admin key file (--local).")
    parser.add_argument(
        "--tls-dir", type=Path, help="Directory with ca.crt, node.crt, node.key (--local)."
    )
    parser.add_argument("--signup", choices=("open", "closed"), default=SIGNUP_DEFAULT)
    parser.add_argument("--python", help="Interpreter of the node (--local: this one).")
    parser.add_argument("--data-device", default="", help="Block device of the data volume.")
    parser.add_argument("--source", default="", help="pip requirement to install (EC2).")
    parser.add_argument("--secret-parameter", default="", help="SSM parameter name (EC2).")
    parser.add_argument("--admin-key-parameter", default="", help="SSM parameter name (EC2).")
    for part, what in (("ca", "CA certificate"), ("cert", "certificate"), ("key", "key")):
        parser.add_argument(
            f"--tls-{part}-parameter", default="", help=f"SSM parameter: TLS {what} (EC2)."
        )
    parser.add_argument("--region", default="", help="Region of the SSM parameters (EC2).")
    options = parser.parse_args(arguments)

    cluster = options.cluster or cluster_string(
        [address.strip() for address in options.addresses.split(",")],
        options.client_port,
        options.raft_port,
    )
    if options.local:
        if not (options.data_dir and options.secret_file):
            parser.error("--local needs --data-dir and --secret-file")
        settings = local_settings(
            options.node_id,
            cluster,
            config_dir=options.out.resolve(),
            data_dir=Path(options.data_dir).resolve(),
            secret_file=options.secret_file.resolve(),
            admin_key_file=options.admin_key_file.resolve() if options.admin_key_file else None,
            tls_dir=options.tls_dir.resolve() if options.tls_dir else None,
            signup=options.signup,
            python=options.python or sys.executable,
        )
    else:
        settings = NodeBootstrap(
            node_id=options.node_id,
            cluster=cluster,
            data_device=options.data_device,
            install_source=options.source,
            secret_parameter=options.secret_parameter,
            secret_region=options.region,
            admin_key_parameter=options.admin_key_parameter,
            tls_ca_parameter=options.tls_ca_parameter,
            tls_cert_parameter=options.tls_cert_parameter,
            tls_key_parameter=options.tls_key_parameter,
            signup=options.signup,
        )
        if options.data_dir:
            settings = replace(settings, data_dir=options.data_dir)
        if options.python:
            settings = replace(settings, python=options.python)
    try:
        written = write_node(settings, options.out)
    except RenderError as error:
        parser.error(str(error))
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
