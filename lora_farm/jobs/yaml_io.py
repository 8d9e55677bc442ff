"""YAML reading with YAML 1.2 scalars, so specs mean what they look like.

PyYAML follows YAML 1.1: ``2e-4`` is a string, ``no``/``on`` are booleans and ``1:30`` is the
integer 90. Job specs are written by people who expect the YAML 1.2 reading, so this loader
accepts only ``true``/``false`` as booleans, reads ``2e-4`` as a float and never does base-60.

It also refuses, before anything is built, what YAML accepts but a spec must not hold: a key given
twice in one mapping (YAML keeps the last one silently) and aliases that expand to far more values
than the file holds (a 639-byte "billion laughs" names 10^9 values).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


MAX_ALIAS_VALUES = 10_000  # values aliases may add beyond those written out

# libyaml composes a 20,000-line file in 0.1 s, the pure-Python parser in 0.8 s
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SpecYamlLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """SafeLoader with YAML 1.2 core-schema booleans, floats and integers."""


class YamlRefused(yaml.YAMLError):
    """Raised when well-formed YAML is refused: a duplicate key, aliases that expand too far.
    ``problems`` holds (field, message, fix) triples."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        super().__init__("; ".join(message for _, message, _ in problems))
        self.problems = problems


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
    return int(text, 0 if text.startswith(("0o", "0x")) else 10)  # base 10: "010" is ten, as YAML 1.2 says


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    return float(loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan"))


SpecYamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
SpecYamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_spec_yaml(text: str) -> Any:
    loader = SpecYamlLoader(text)  # a SafeLoader: plain data only, never objects
    try:
        node = loader.get_single_node()  # aliases are shared nodes here, nothing is expanded
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node) -> None:
    """Measure the node graph (shared nodes once) and look for duplicate keys, before building."""
    sizes: dict[int, int] = {}  # id(collection) -> values it expands to; -1 while being measured
    written = [0]  # scalars as written: an aliased scalar adds one value, never more
    problems: list[tuple[str, str, str]] = []

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise YamlRefused([("", f"holds a recursive alias at line {node.start_mark.line + 1} "
                                    "(a value that contains itself).", "write the values out.")])
            return sizes[id(node)]
        sizes[id(node)] = -1
        children = node.value
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
            problems.extend(_duplicate_keys(node))
        scalars = sum(isinstance(child, yaml.ScalarNode) for child in children)
        written[0] += scalars
        sizes[id(node)] = 1 + scalars + sum(size(child) for child in children
                                            if not isinstance(child, yaml.ScalarNode))
        return sizes[id(node)]

    expanded = 1 if isinstance(root, yaml.ScalarNode) else size(root)
    if expanded - len(sizes) - written[0] > MAX_ALIAS_VALUES:
        raise YamlRefused([("", f"uses YAML aliases (*name) that expand to {expanded:,} values "
                            f"though the file writes {len(sizes) + written[0]:,}; at most "
                            f"{MAX_ALIAS_VALUES:,} more are allowed.",
                            "write the values out instead of the aliases.")])
    if problems:
        raise YamlRefused(problems)


def _duplicate_keys(node: yaml.MappingNode) -> list[tuple[str, str, str]]:
    seen: dict[tuple[str, str], int] = {}
    problems = []
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in seen:
            problems.append((key.value[:100], f"is given twice in one mapping, on lines "
                             f"{seen[key.tag, key.value]} and {line} (YAML would keep the last one "
                             "silently).", "keep one of them."))
        seen.setdefault((key.tag, key.value), line)
    return problems


class SpecYamlDumper(yaml.SafeDumper):
    """Quotes every string our loader would read as something else (``"1e5"``, ``"true"``)."""


SpecYamlDumper.yaml_implicit_resolvers = SpecYamlLoader.yaml_implicit_resolvers


def dump_yaml(data: Any) -> str:
    """YAML that ``parse_spec_yaml`` reads back to exactly ``data``."""
    return yaml.dump(data, Dumper=SpecYamlDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False)
