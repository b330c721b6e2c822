"""Experiment-config loading: YAML files + `--set dotted.key=value` overrides into typed dataclasses.

Owns: the one config loader of the project and the `--config/--set` argument
parsing every job shares. The dataclasses themselves live with the component
they configure; unknown keys are rejected with the valid ones listed
(`dreamllm.config.from_dict`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from dreamllm.config import from_dict

T = TypeVar("T")


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: numbers, bools, lists) to a nested dict."""
    if "=" not in assignment:
        raise ValueError(f"--set expects dotted.key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {p!r} is a value, not a section")
    node[parts[-1]] = parse_value(raw)


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `2e-3` as a float (YAML 1.1 needs `2.0e-3`; learning rates are written so)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_value(raw: str) -> Any:
    """A --set value, parsed as YAML (numbers, bools, lists)."""
    return parse_yaml(raw) if raw.strip() else ""


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a new dict; neither input changes)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> T:
    """`cls` from `base` (e.g. a stage's defaults), then a YAML file, then overrides; missing keys keep
    the dataclass defaults."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file not found: {p}")
        try:
            tree = parse_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
    tree = deep_merge(copy.deepcopy(base or {}), tree)
    for o in overrides:
        apply_override(tree, o)
    return from_dict(cls, tree)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML experiment config (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.max_steps=20 (repeatable)")
    return parser


def parse_job_args(cls: type[T], argv: Sequence[str] | None, description: str,
                   base: dict[str, Any] | None = None) -> T:
    """Parse `--config FILE --set k=v ...` into `cls`; a bad config exits with a one-line reason."""
    parser = add_config_args(argparse.ArgumentParser(description=description))
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides, base)
    except ValueError as e:
        parser.exit(2, f"config error: {e}\n")


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{'a.b': value}` of a (nested) dataclass, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(v, dict):
            out.update(to_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
