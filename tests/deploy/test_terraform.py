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
from dataclasses import asdict, fields
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


def test_aws_provider_is_pinned() -> None:
    (terraform,) = [block for path in TF_FILES for block in parse(path).get("terraform", [])]
    (aws,) = terraform["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert re.fullmatch(r"~> \d+\.\d+", aws["version"])


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
    bootstrap_fields = {field.name for field in fields(render.NodeBootstrap)}
    assert templatefile_call_keys("bootstrap.sh.tftpl") == bootstrap_fields - {"cluster"}
    assert templatefile_call_keys("node.toml.tftpl") == {"node_id", "data_dir", "cluster"}
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


def test_templates_render_the_same_in_terraform_and_renderer(
    tmp_path: Path, render: ModuleType
) -> None:
    settings = render.NodeBootstrap(
        node_id="n2",
        cluster=render.cluster_string(["10.40.0.10", "10.40.1.10", "10.40.2.10"]),
        data_device="/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0",
        install_source="git+https://github.com/acme/chasqui.git@v0.1.0",
        secret_parameter="/chasqui/cluster-secret",
        secret_region="eu-west-1",
    )
    rendered = render.render_node(settings)
    values = asdict(settings)
    template_dir = DEPLOY_DIR / "cloud-init"

    def call(name: str, variables: dict[str, str]) -> str:
        return f"templatefile({hcl(str(template_dir / name))}, {hcl(variables)})"

    node_toml_variables = {key: values[key] for key in ("node_id", "data_dir", "cluster")}
    unit_path = hcl(str(DEPLOY_DIR / "systemd" / "chasqui-node.service"))
    user_data = (
        f"templatefile({hcl(str(template_dir / 'user-data.yaml.tftpl'))}, {{"
        f"node_id = {hcl(settings.node_id)}, config_dir = {hcl(settings.config_dir)}, "
        f"node_toml_b64 = base64encode({call('node.toml.tftpl', node_toml_variables)}), "
        f"systemd_unit_b64 = base64encode(file({unit_path})), "
        f"bootstrap_b64 = base64encode({call('bootstrap.sh.tftpl', values)})}})"
    )
    node_toml, bootstrap, user_data_text = console(
        tmp_path,
        [
            call("node.toml.tftpl", node_toml_variables),
            call("bootstrap.sh.tftpl", values),
            user_data,
        ],
    )
    assert node_toml == rendered["node.toml"]
    assert bootstrap == rendered["bootstrap.sh"]
    assert user_data_text == rendered["user-data.yaml"]
