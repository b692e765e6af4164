"""What a deployment tells Flower, in Flower's own syntax: names, the ``flwr`` connection file, run
configs, node configs, and the JSON that ``flwr … --format json`` prints back (no Flower import)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

CONNECTION = "simlab"
FINISHED = "finished"
COMPLETED = "finished:completed"
#: Exit code of a SuperNode whose key the SuperLink does not know ("Failed to activate SuperNode").
EXIT_NODE_NOT_REGISTERED = 305
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class DeploymentError(RuntimeError):
    pass


def check_name(name: str) -> str:
    """A SuperNode (key) name: it names files and processes, so letters, digits, '.', '_' and '-'."""
    if not _NAME.match(name):
        raise DeploymentError(f"{name!r}: SuperNode key names may use letters, digits, '.', '_' and '-'")
    return name


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _scalar(value: str | int | float | bool) -> str:
    """A TOML value: booleans and numbers as such, anything else as a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return toml_str(str(value))


def run_config_toml(values: Mapping[str, str | int | float | bool]) -> str:
    """A flat TOML document (``key = value`` lines); strings as TOML basic strings (JSON escapes)."""
    lines = []
    for k, v in values.items():
        if not _KEY.match(k):
            raise DeploymentError(f"run config key {k!r}: letters, digits, '-' and '_' only")
        lines.append(f"{k} = {_scalar(v)}")
    return "\n".join(lines) + "\n"


def node_config_arg(values: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` text: ``key="string" key=3`` (values are TOML; strings must be quoted)."""
    parts = []
    for k, v in values.items():
        text = str(v)
        if not isinstance(v, (bool, int, float)) and (any(c.isspace() for c in text) or '"' in text):
            raise DeploymentError(f"node config {k}={v!r}: values may not contain spaces or quotes")
        parts.append(f"{k}={_scalar(v)}")
    return " ".join(parts)


def connection_toml(address: str, root_cert: str | None) -> str:
    """``$FLWR_HOME/config.toml`` with one connection, :data:`CONNECTION`, the default of every ``flwr``
    call; TLS with ``root_cert`` (the CA certificate), else insecure."""
    lines = ["[superlink]", f"default = {toml_str(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {toml_str(address)}"]
    lines.append(f"root-certificates = {toml_str(root_cert)}" if root_cert else "insecure = true")
    return "\n".join(lines) + "\n"


def last_json(text: str) -> dict | None:
    """The JSON object `flwr … --format json` prints (the last line that parses)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
