"""The Terraform in deploy/terraform, checked offline: no provider download, no AWS account.

Every `.tf` file parses with python-hcl2 (the `hcl2` module that checkov installs); checkov finds
no failed check, and each check skipped in the code says why; `terraform fmt` finds nothing to
change; the variables' validation rules accept and reject what they claim, evaluated by
`terraform console`, which needs no providers; and the cloud-init templates render byte for
byte the same through Terraform's own `templatefile()` as through deploy/render.py, which the
local bootstrap tests run. `terraform validate` is not run: it needs `terraform init`, which
downloads the AWS provider.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY_DIR, TERRAFORM_DIR

CHECKOV_TIMEOUT_S = 240
TERRAFORM_TIMEOUT_S = 60
TF_FILES = sorted(TERRAFORM_DIR.glob("*.tf"))
SKIP_COMMENT = re.compile(r"#\s*checkov:skip=(CKV2?_[A-Z0-9_]+)(.*)")


def terraform_environment(tmp_path: Path) -> dict[str, str]:
    """No update check, no CLI config, no plugin cache: nothing that reaches the network."""
    empty_config = tmp_path / "terraformrc"
    empty_config.write_text("")
    return {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_CLI_CONFIG_FILE": str(empty_config),
        "TF_INPUT": "0",
    }


def terraform_binary() -> str:
    binary = shutil.which("terraform")
    if binary is None:
        pytest.skip("terraform is not installed; install it to run fmt and console checks")
    return binary


def hcl2_module() -> ModuleType:
    try:
        import hcl2
    except ImportError:
        pytest.skip("the hcl2 module is missing: pip install -e '.[test]' (checkov brings it)")
    return hcl2


def parse(path: Path) -> dict[str, Any]:
    with open(path) as source:
        parsed: dict[str, Any] = hcl2_module().load(source)
    return parsed


def blocks(kind: str) -> dict[str, Any]:
    """Every `kind` block ("resource", "variable", ...) across the .tf files: resources and data
    sources by type then name, other blocks by name."""
    found: dict[str, Any] = {}
    for path in TF_FILES:
        for block in parse(path).get(kind, []):
            for key, body in block.items():
                if kind in ("resource", "data"):
                    found.setdefault(key, {}).update(body)
                else:
                    found[key] = body
    return found


def console(tmp_path: Path, expressions: list[str]) -> list[Any]:
    """Evaluate the expressions with `terraform console` in an empty directory (no providers,
    no init): one line, one list, so that one run answers all of them."""
    workdir = tmp_path / "console"
    workdir.mkdir(exist_ok=True)
    joined = " ".join(" ".join(expression.split("\n")) for expression in expressions)
    assert len(expressions) == 1 or "\n" not in joined
    completed = subprocess.run(
        [terraform_binary(), "console"],
        input=f"jsonencode([{', '.join(expressions)}])\n",
        capture_output=True,
        text=True,
        cwd=workdir,
        env=terraform_environment(tmp_path),
        timeout=TERRAFORM_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    values: list[Any] = json.loads(json.loads(completed.stdout))
    assert len(values) == len(expressions), completed.stdout
    return values


def hcl(value: Any) -> str:
    """A Python value as an HCL literal (JSON is valid HCL for strings, numbers, lists)."""
    return json.dumps(value)


# -- parsing ----------------------------------------------------------------------------------


def test_terraform_directory_has_the_expected_files() -> None:
    names = {path.name for path in TERRAFORM_DIR.iterdir()}
    assert {"versions.tf", "variables.tf", "outputs.tf", "terraform.tfvars.example"} <= names


@pytest.mark.parametrize("path", TF_FILES, ids=[path.name for path in TF_FILES])
def test_every_tf_file_parses(path: Path) -> None:
    assert parse(path), f"{path.name} parsed to nothing"


@pytest.mark.parametrize("provider", ["aws", "random", "tls"])
def test_providers_are_pinned(provider: str) -> None:
    (terraform,) = [block for path in TF_FILES for block in parse(path).get("terraform", [])]
    (pinned,) = terraform["required_providers"][0][provider]
    assert pinned["source"] == f"hashicorp/{provider}"
    assert re.fullmatch(r"~> \d+\.\d+", pinned["version"])


def test_every_variable_is_documented_and_typed() -> None:
    variables = blocks("variable")
    assert len(variables) >= 10
    for name, body in variables.items():
        assert len(body.get("description", [""])[0]) > 20, f"variable {name} lacks a description"
        assert "type" in body, f"variable {name} has no type"


def test_client_cidrs_has_no_default_and_no_open_range() -> None:
    client_cidrs = blocks("variable")["client_cidrs"]
    assert "default" not in client_cidrs
    assert "0.0.0.0/0" in client_cidrs["validation"][0]["condition"][0]


def test_example_tfvars_sets_every_required_variable() -> None:
    required = {name for name, body in blocks("variable").items() if "default" not in body}
    example = hcl2_module().loads((TERRAFORM_DIR / "terraform.tfvars.example").read_text())
    assert required <= set(example), f"missing from the example: {required - set(example)}"


def test_security_group_opens_raft_only_to_itself() -> None:
    group = blocks("resource")["aws_security_group"]["node"]
    for rule in group["ingress"] + group["egress"]:
        if rule["from_port"] == ["${var.raft_port}"]:
            assert rule.get("self") == [True] and "cidr_blocks" not in rule, rule
        if rule["from_port"] == ["${var.client_port}"] and "cidr_blocks" in rule:
            assert rule["cidr_blocks"] == ["${var.client_cidrs}"], rule


def test_instances_require_imdsv2_and_encrypt_every_volume() -> None:
    resources = blocks("resource")
    instance = resources["aws_instance"]["node"]
    assert instance["metadata_options"][0]["http_tokens"] == ["required"]
    assert instance["root_block_device"][0]["encrypted"] == [True]
    volume = resources["aws_ebs_volume"]["data"]
    assert volume["encrypted"] == [True] and volume["type"] == ["gp3"]
    assert resources["aws_ssm_parameter"]["cluster_secret"]["type"] == ["SecureString"]


def test_every_parameter_is_a_secure_string_under_the_cluster_key() -> None:
    parameters = blocks("resource")["aws_ssm_parameter"]
    assert set(parameters) == {"cluster_secret", "admin_key", "tls_ca_cert", "tls_cert", "tls_key"}
    for name, parameter in parameters.items():
        assert parameter["type"] == ["SecureString"], name
        assert parameter["key_id"] == ["${aws_kms_key.main.arn}"], name


def test_admin_key_is_generated_url_safe_and_only_its_parameter_is_output() -> None:
    resources = blocks("resource")
    admin_key = resources["random_password"]["admin_key"]
    assert admin_key["special"] == [False] and admin_key["length"][0] >= 32
    assert resources["aws_ssm_parameter"]["admin_key"]["value"] == [
        "${random_password.admin_key.result}"
    ]
    outputs = blocks("output")
    assert outputs["admin_key_parameter"]["value"] == ["${aws_ssm_parameter.admin_key.name}"]
    for name, output in outputs.items():
        value = str(output["value"])
        for secret in (".result", "private_key_pem", "ssm_parameter.cluster_secret.value"):
            assert secret not in value, f"output {name} exposes {secret}"


def test_node_role_reads_exactly_the_bootstrap_parameters() -> None:
    (statement,) = [
        s for s in blocks("data")["aws_iam_policy_document"]["node"]["statement"]
        if s["actions"] == [["ssm:GetParameter"]] or s["actions"] == ["ssm:GetParameter"]
    ]  # fmt: skip
    assert statement["resources"] == ["${local.node_parameter_arns}"]
    text = (TERRAFORM_DIR / "iam.tf").read_text()
    arns = text[text.index("node_parameter_arns = concat(") :]
    arns = arns[: arns.index("\n  )\n")]
    referenced = set(re.findall(r"aws_ssm_parameter\.([a-z_]+)", arns))
    assert referenced == set(blocks("resource")["aws_ssm_parameter"])
    assert '"' not in arns, "only the parameters' own ARNs: no literal ARN, no wildcard"


def test_client_tls_makes_a_ca_and_a_certificate_per_node_for_its_address() -> None:
    resources = blocks("resource")
    assert blocks("variable")["client_tls"]["default"] == [True]
    ca = resources["tls_self_signed_cert"]["ca"]
    assert ca["is_ca_certificate"] == [True] and "cert_signing" in ca["allowed_uses"][0]
    request = resources["tls_cert_request"]["node"]
    assert request["for_each"] == ["${var.client_tls ? local.nodes : {}}"]
    assert request["ip_addresses"] == [["${each.value.private_ip}"]]
    signed = resources["tls_locally_signed_cert"]["node"]
    assert signed["ca_cert_pem"] == ["${tls_self_signed_cert.ca[0].cert_pem}"]
    assert "server_auth" in signed["allowed_uses"][0]
    assert resources["aws_ssm_parameter"]["tls_key"]["value"] == [
        "${tls_private_key.node[each.key].private_key_pem_pkcs8}"
    ]
    for key in resources["tls_private_key"].values():
        assert key["algorithm"] == ["ECDSA"] and key["ecdsa_curve"] == ["P256"]
    (ca_output,) = blocks("output")["tls_ca_certificate"]["value"]
    assert ca_output.startswith("${var.client_tls ? tls_self_signed_cert.ca[0].cert_pem : ")


# -- checkov -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run for the module: it takes seconds, and every check reads the same report."""
    try:
        import checkov  # noqa: F401
    except ImportError:
        pytest.skip("checkov is not installed: pip install -e '.[test]'")
    command = [
        sys.executable, "-m", "checkov.main",
        "--directory", str(TERRAFORM_DIR),
        "--framework", "terraform",
        "--skip-download",  # offline: no guidelines or policies from the vendor's API
        "--output", "json",
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=CHECKOV_TIMEOUT_S,
        check=False,
        cwd=tmp_path_factory.mktemp("checkov"),
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
    )
    assert completed.returncode in (0, 1), completed.stderr[-4000:]
    report: dict[str, Any] = json.loads(completed.stdout)
    return report


def test_checkov_finds_no_failed_check(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    failed = [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for check in checkov_report["results"]["failed_checks"]
    ]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 50, "checkov ran too few checks; did it parse the files?"
    assert not failed, "\n".join(failed)


def test_every_checkov_skip_gives_a_reason(checkov_report: dict[str, Any]) -> None:
    for check in checkov_report["results"]["skipped_checks"]:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) > 30, (
            f"{check['check_id']} on {check['resource']} is skipped without a reason"
        )
    for path in TF_FILES:
        for match in SKIP_COMMENT.finditer(path.read_text()):
            assert re.match(r":\s*\S.{29,}", match.group(2)), f"{path.name}: {match.group(0)}"


# -- terraform, offline ------------------------------------------------------------------------


def test_terraform_fmt_finds_nothing_to_change(tmp_path: Path) -> None:
    completed = subprocess.run(
        [terraform_binary(), "fmt", "-check", "-diff", "-recursive", str(TERRAFORM_DIR)],
        capture_output=True,
        text=True,
        env=terraform_environment(tmp_path),
        timeout=TERRAFORM_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_terraform_validate_needs_the_provider() -> None:
    pytest.skip(
        "terraform validate needs `terraform init`, which downloads the AWS provider from the "
        "registry; these tests stay offline (run `terraform init && terraform validate` in "
        "deploy/terraform where the registry is reachable)"
    )


VALIDATION_CASES = {
    "node_count": ([3, 5, 7, 9], [1, 2, 4, 6, 11, 3.5]),
    "client_cidrs": (
        [["10.0.0.0/8"], ["10.1.0.0/16", "192.168.4.0/24"]],
        [[], ["0.0.0.0/0"], ["10.0.0.0/33"]],
    ),
    "chasqui_source": (
        ["chasqui==0.1.0", "git+https://github.com/acme/chasqui.git@v0.1.0"],
        [
            "chasqui",
            "chasqui>=0.1",
            "git+https://github.com/acme/chasqui.git",
            "https://x@y; rm -rf /",
        ],
    ),
    "availability_zones": ([["a", "b", "c"]], [["a", "b"], ["a", "a", "b"], ["a", "b", "c", "d"]]),
    "instance_type": (["m6i.large", "t3.medium", "c7g.xlarge"], ["t2.micro", "m4.large"]),
    "vpc_cidr": (["10.40.0.0/16", "10.0.0.0/22"], ["10.0.0.0/23", "nonsense"]),
    "signup": (["closed", "open"], ["Closed", "", "invite"]),
    "tls_cert_validity_days": ([60, 365, 825], [30, 3650]),
}


@pytest.mark.parametrize("name", sorted(VALIDATION_CASES))
def test_variable_validation_accepts_and_rejects(tmp_path: Path, name: str) -> None:
    """Each validation condition, taken verbatim from variables.tf, evaluated by Terraform.
    (Verbatim from the source text: the hcl2 module's rendering of expressions is lossy.)"""
    assert "validation" in blocks("variable")[name]
    text = (TERRAFORM_DIR / "variables.tf").read_text()
    block = text[text.index(f'variable "{name}" {{') :]
    block = block[: block.index("\n}\n")]
    (condition,) = re.findall(r"^\s*condition\s*=\s*(.+)$", block, re.MULTILINE)
    accepted, rejected = VALIDATION_CASES[name]
    cases = [*accepted, *rejected]
    expressions = [condition.replace(f"var.{name}", f"({hcl(value)})") for value in cases]
    verdicts = console(tmp_path, expressions)
    assert verdicts == [True] * len(accepted) + [False] * len(rejected), list(
        zip(cases, verdicts, strict=True)
    )


# -- the templates: Terraform and render.py agree ----------------------------------------------


def templatefile_call_keys(template_name: str) -> set[str]:
    """The keys nodes.tf passes to templatefile() for `template_name`."""
    text = (TERRAFORM_DIR / "nodes.tf").read_text()
    start = text.index(f'{template_name}", {{')
    body, depth = [], 0
    for character in text[start + len(template_name) + 4 :]:
        depth += character == "{"
        depth -= character == "}"
        if depth < 0:
            break
        body.append(character)
    # Keys at the first nesting level only: nested templatefile() calls have their own.
    keys, depth = set(), 0
    for line in "".join(body).splitlines():
        if depth == 0 and (match := re.match(r"\s*([a-z_0-9]+)\s*=", line)):
            keys.add(match.group(1))
        depth += line.count("{") + line.count("(") - line.count("}") - line.count(")")
    return keys


def test_terraform_passes_every_template_variable(render: ModuleType) -> None:
    settings = render.NodeBootstrap(node_id="n1", cluster="n1=a:1/a:2", secret_file="s")
    bootstrap_fields = {field.name for field in fields(render.NodeBootstrap)}
    assert set(render.bootstrap_variables(settings)) == bootstrap_fields - {"cluster", "signup"}
    assert templatefile_call_keys("bootstrap.sh.tftpl") == set(render.bootstrap_variables(settings))
    assert templatefile_call_keys("node.toml.tftpl") == set(render.node_toml_variables(settings))
    assert templatefile_call_keys("user-data.yaml.tftpl") == {
        "node_id", "config_dir", "node_toml_b64", "systemd_unit_b64", "bootstrap_b64",
    }  # fmt: skip


def test_renderer_defaults_match_terraform(render: ModuleType) -> None:
    variables = blocks("variable")
    assert variables["client_port"]["default"] == [render.CLIENT_PORT_DEFAULT]
    assert variables["raft_port"]["default"] == [render.RAFT_PORT_DEFAULT]
    assert variables["python"]["default"] == [render.PYTHON_DEFAULT]
    (locals_block,) = [
        b for path in TF_FILES for b in parse(path).get("locals", []) if "config_dir" in b
    ]
    assert locals_block["config_dir"] == [render.CONFIG_DIR_DEFAULT]
    assert locals_block["data_dir"] == [render.DATA_DIR_DEFAULT]
    assert locals_block["venv_dir"] == [render.VENV_DIR_DEFAULT]
    assert variables["signup"]["default"] == [render.SIGNUP_DEFAULT]
    unit = (DEPLOY_DIR / "systemd" / "chasqui-node.service").read_text()
    assert f"ExecStart={render.VENV_DIR_DEFAULT}/bin/chasqui-node start --config " in unit
    assert f"{render.CONFIG_DIR_DEFAULT}/node.toml" in unit
    assert f"EnvironmentFile={render.CONFIG_DIR_DEFAULT}/node.env" in unit
    assert f"RequiresMountsFor={render.DATA_DIR_DEFAULT}" in unit


def test_terraform_cluster_string_matches_renderer(tmp_path: Path, render: ModuleType) -> None:
    """The `nodes` and `cluster` locals, evaluated by Terraform for 3 and 5 nodes: node i sits
    in zone i % 3 at a fixed address, and the member list is what render.py builds from them."""
    text = (TERRAFORM_DIR / "locals.tf").read_text()
    subnets = re.search(r"subnet_cidrs = (\[.*\])", text).group(1)  # type: ignore[union-attr]
    nodes = re.search(r"  nodes = (\{.*?\n  \})\n", text, re.DOTALL).group(1)  # type: ignore[union-attr]
    expressions = []
    for node_count in (3, 5):
        expression = nodes.replace("local.subnet_cidrs", f"({subnets})")
        for name, value in (("node_count", node_count), ("vpc_cidr", "10.40.0.0/16")):
            expression = expression.replace(f"var.{name}", hcl(value))
        expressions.append(" ".join(expression.split()))
    three, five = console(tmp_path, expressions)
    assert three == {
        "n1": {"zone_index": 0, "private_ip": "10.40.0.10"},
        "n2": {"zone_index": 1, "private_ip": "10.40.1.10"},
        "n3": {"zone_index": 2, "private_ip": "10.40.2.10"},
    }
    assert [five[f"n{i}"]["zone_index"] for i in range(1, 6)] == [0, 1, 2, 0, 1]
    assert five["n4"]["private_ip"] == "10.40.0.11" and five["n5"]["private_ip"] == "10.40.1.11"
    assert render.cluster_string([three[f"n{i}"]["private_ip"] for i in (1, 2, 3)]) == (
        "n1=10.40.0.10:7100/10.40.0.10:7200,n2=10.40.1.10:7100/10.40.1.10:7200,"
        "n3=10.40.2.10:7100/10.40.2.10:7200"
    )


def tls_parameters(node_id: str) -> dict[str, str]:
    return {
        "tls_ca_parameter": "/chasqui/tls/ca-cert",
        "tls_cert_parameter": f"/chasqui/tls/{node_id}/cert",
        "tls_key_parameter": f"/chasqui/tls/{node_id}/key",
    }


def templatefile_expressions(render: ModuleType, settings: Any) -> dict[str, str]:
    """HCL that renders the node's three files as nodes.tf does: node.toml, bootstrap.sh and the
    cloud-config embedding them, with tls_comment computed by nodes.tf's own expression."""
    template_dir = DEPLOY_DIR / "cloud-init"

    def call(name: str, variables: dict[str, str]) -> str:
        return f"templatefile({hcl(str(template_dir / name))}, {hcl(variables)})"

    toml_variables = render.node_toml_variables(settings)
    node_toml = call("node.toml.tftpl", toml_variables).replace(
        f'"tls_comment": {hcl(toml_variables["tls_comment"])}',
        f'"tls_comment": ({hcl(settings.client_tls)} ? "" : "# ")',
    )
    bootstrap = call("bootstrap.sh.tftpl", render.bootstrap_variables(settings))
    unit_path = hcl(str(DEPLOY_DIR / "systemd" / "chasqui-node.service"))
    user_data = (
        f"templatefile({hcl(str(template_dir / 'user-data.yaml.tftpl'))}, {{"
        f"node_id = {hcl(settings.node_id)}, config_dir = {hcl(settings.config_dir)}, "
        f"node_toml_b64 = base64encode({node_toml}), "
        f"systemd_unit_b64 = base64encode(file({unit_path})), "
        f"bootstrap_b64 = base64encode({bootstrap})}})"
    )
    return {"node.toml": node_toml, "bootstrap.sh": bootstrap, "user-data.yaml": user_data}


@pytest.mark.parametrize("client_tls", [True, False], ids=["tls", "plaintext"])
def test_templates_render_the_same_in_terraform_and_renderer(
    tmp_path: Path, render: ModuleType, client_tls: bool
) -> None:
    """The renderer's variables are the ones nodes.tf passes (test above); here Terraform's own
    templatefile() and render.py turn them into the same bytes, with TLS on and off."""
    settings = render.NodeBootstrap(
        node_id="n2",
        cluster=render.cluster_string(["10.40.0.10", "10.40.1.10", "10.40.2.10"]),
        data_device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0",
        install_source="git+https://github.com/acme/chasqui.git@v0.1.0",
        secret_parameter="/chasqui/cluster-secret",
        secret_region="eu-west-1",
        admin_key_parameter="/chasqui/admin-key",
        **(tls_parameters("n2") if client_tls else {}),
    )
    rendered = render.render_node(settings)
    expressions = templatefile_expressions(render, settings)
    evaluated = console(tmp_path, list(expressions.values()))
    for name, text in zip(expressions, evaluated, strict=True):
        assert text == rendered[name], f"{name} differs between Terraform and render.py"
    assert ('\ntls_key = "/etc/chasqui/tls/node.key"' in rendered["node.toml"]) is client_tls
    nodes_tf = (TERRAFORM_DIR / "nodes.tf").read_text()
    assert 'tls_comment = var.client_tls ? "" : "# "' in nodes_tf


def test_user_data_fits_the_ec2_limit_with_nine_nodes(tmp_path: Path, render: ModuleType) -> None:
    """EC2 takes at most 16 KB of user data; nodes.tf sends the cloud-config gzipped
    (base64gzip), measured here by Terraform for the longest member list and long values."""
    name = "/chasqui-production-cluster-a1"
    settings = render.NodeBootstrap(
        node_id="n9",
        cluster=render.cluster_string([f"10.240.{i % 3}.{10 + i // 3}" for i in range(9)]),
        data_device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0",
        install_source="git+https://github.com/some-organisation/chasqui.git@" + "0" * 40,
        secret_parameter=f"{name}/cluster-secret",
        secret_region="ap-southeast-2",
        admin_key_parameter=f"{name}/admin-key",
        **{key: name + value for key, value in tls_parameters("n9").items()},
    )
    nodes_tf = (TERRAFORM_DIR / "nodes.tf").read_text()
    assert "user_data_base64 = base64gzip(local.user_data[each.key])" in nodes_tf
    user_data = templatefile_expressions(render, settings)["user-data.yaml"]
    (encoded_length,) = console(tmp_path, [f"length(base64gzip({user_data}))"])
    gzipped_bytes = encoded_length * 3 // 4
    assert gzipped_bytes < 16384 // 2, f"{gzipped_bytes} bytes: too close to EC2's 16 KB"
    assert len(render.render_node(settings)["user-data.yaml"]) > 16384 // 2  # worth gzipping
