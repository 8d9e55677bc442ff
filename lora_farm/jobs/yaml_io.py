"""YAML reading with YAML 1.2 scalars, so specs mean what they look like.

PyYAML follows YAML 1.1: ``2e-4`` is a string, ``no``/``on`` are booleans and ``1:30`` is the
integer 90. Job specs are written by people who expect the YAML 1.2 reading, so this loader
accepts only ``true``/``false`` as booleans, reads ``2e-4`` as a float and never does base-60.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class SpecYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans, floats and integers."""


SpecYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float",
                           "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SpecYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
SpecYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
SpecYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    return float(loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan"))


SpecYamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
SpecYamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_spec_yaml(text: str) -> Any:
    loader = SpecYamlLoader(text)  # a SafeLoader: plain data only, never objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class SpecYamlDumper(yaml.SafeDumper):
    """Quotes every string our loader would read as something else (``"1e5"``, ``"true"``)."""


SpecYamlDumper.yaml_implicit_resolvers = SpecYamlLoader.yaml_implicit_resolvers


def dump_yaml(data: Any) -> str:
    """YAML that ``parse_spec_yaml`` reads back to exactly ``data``."""
    return yaml.dump(data, Dumper=SpecYamlDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False)
