"""Experiment-config loading: YAML files + `--set dotted.key=value` overrides into typed dataclasses.

Owns: the one config loader of the project, the `--config/--set` argument
parsing every job shares, and the configuration reference (`--help-config`:
every key of a job with its value and the one-line docstring under its field).
The dataclasses themselves live with the component they configure; unknown
keys are rejected with the valid ones listed and every value is checked
against its field's type (`dreamllm.config.from_dict`). A map a YAML file
writes replaces the default map; `--set a.b.c=v` into a map (`sources.laion.uri`)
changes that value of the entry as it stood and keeps everything else.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
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
        if "=" in o:
            _seed_maps(cls, None, tree, o.split("=", 1)[0].strip().split("."))
        apply_override(tree, o)
    return from_dict(cls, tree)


def _seed_maps(cls: type, default: Any, node: Any, parts: list[str]) -> None:
    """Before `--set a.b.c=v`: put into `node` (the tree of dataclass `cls`, whose current value is `default`,
    None for the field defaults) every map field (`dict[...]`, e.g. `sources`) on the path that the tree does
    not name yet, with its default entries. The override then changes one value of one entry and keeps the
    rest; without this the map would hold only the new entry, its other fields back at their defaults
    (`--set sources.laion.uri=...` read a webdataset folder as MMC4). A map the YAML names stays as written."""
    if len(parts) < 2 or not dataclasses.is_dataclass(cls) or not isinstance(node, dict):
        return
    name, rest = parts[0], parts[1:]
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:  # an unknown key: from_dict names the valid ones
        return
    if default is not None:
        value = getattr(default, name)
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is dict and isinstance(value, dict):
        seeded = name not in node
        if seeded:
            node[name] = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
                          for k, v in value.items()}
        entry = node[name].get(rest[0]) if isinstance(node[name], dict) else None
        args = typing.get_args(hint)
        if args:  # an entry's own maps: their defaults are the entry's, if it is a default one
            _seed_maps(args[1], value.get(rest[0]) if seeded else None, entry, rest[1:])
    elif dataclasses.is_dataclass(hint):
        _seed_maps(hint, value if dataclasses.is_dataclass(value) else None, node.setdefault(name, {}), rest)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML experiment config (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.max_steps=20 (repeatable)")
    parser.add_argument("--help-config", action="store_true",
                        help="print every config key with its value (after --config/--set) and what it means, "
                             "then exit")
    return parser


def job_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every job starts from: its docstring as the description (kept as written) and
    `--config`, `--set`, `--help-config`. A job with arguments of its own adds them and calls `parse_job`."""
    return add_config_args(argparse.ArgumentParser(description=description,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))


def parse_job(parser: argparse.ArgumentParser, cls: type[T], argv: Sequence[str] | None,
              base: dict[str, Any] | None = None) -> tuple[T, argparse.Namespace]:
    """(config, arguments) of a job whose `parser` came from `job_parser`; `cls` is loaded from `base`,
    `--config` and `--set`. A bad config exits 2 with a one-line reason. `--help-config` prints the
    reference and exits 0 before the job's own arguments are checked (a required one may be missing)."""
    first, _ = add_config_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    if first.help_config:
        print(config_reference(_load_or_exit(parser, cls, first, base)))
        parser.exit(0)
    args = parser.parse_args(argv)
    return _load_or_exit(parser, cls, args, base), args


def parse_job_args(cls: type[T], argv: Sequence[str] | None, description: str,
                   base: dict[str, Any] | None = None) -> T:
    """The config of a job whose only arguments are `--config FILE --set k=v ... --help-config`."""
    return parse_job(job_parser(description), cls, argv, base)[0]


def _load_or_exit(parser: argparse.ArgumentParser, cls: type[T], args: argparse.Namespace,
                  base: dict[str, Any] | None) -> T:
    try:
        return load_config(cls, args.config, args.overrides, base)
    except ValueError as e:
        parser.exit(2, f"config error: {e}\n")


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (litgpt style), by field name; a field that
    a subclass redeclares (a new default) without a docstring keeps its base class's."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and \
                isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_reference(cfg: Any, prefix: str = "") -> str:
    """One line per key of the (nested) dataclass `cfg`: `dotted.key: value  # docstring`, sections first
    named by their own docstring."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key, doc = getattr(cfg, f.name), prefix + f.name, docs.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{key}:  # {doc}" if doc else f"{key}:")
            lines.append(config_reference(value, key + "."))
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            lines.append(f"{key}:  # {doc}" if doc else f"{key}:")
            lines += [config_reference(v, f"{key}.{name}.") for name, v in value.items()]
        else:
            shown = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()
            shown = shown.removesuffix("\n...").removesuffix(" ...").strip()
            lines.append(f"{key}: {shown}" + (f"  # {doc}" if doc else ""))
    return "\n".join(line for line in lines if line)


def _plain(value: Any) -> Any:
    """`value` as YAML-safe data (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{'a.b': value}` of a (nested) dataclass, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(v, dict):
            out.update(to_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
