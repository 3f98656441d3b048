"""Every config key is read somewhere: a key nothing reads is a setting that silently does nothing.

A key ``section.field`` counts as read where code outside the config
dataclasses' own bodies (their ``__post_init__`` validation is not a use)
takes ``<...>.section.field``, ``section.field`` on a variable named after
the section, or ``[...]["section"]["field"]`` / ``section["field"]`` on the
resolved dict, in pretrain/, data_shards/, eval/ or launchers/. The walk is
syntactic (the AST of every module; the launchers' shell text), so a key
read only in a docstring or an error message does not count.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from pretrain.config import Config

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("pretrain", "data_shards", "eval", "launchers")
DECLARATIONS = {"pretrain/config.py", "pretrain/model/spec.py"}
"""Modules that declare config dataclasses: their class bodies are skipped, the rest of them is searched."""

CONSUMED_WHOLESALE: dict[str, str] = {}
"""Keys only consumed through ``dataclasses.asdict`` (passed on whole), each with the reason. None today."""


def _sections() -> dict[str, type]:
    cfg = Config()
    return {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(Config)}


def _config_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in _sections().items() for f in dataclasses.fields(cls)]


def _key_of(node: ast.expr) -> str | None:
    """The name an expression ends in: ``cfg.train`` -> 'train', ``train`` -> 'train', ``c["train"]`` -> 'train'."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return None


class _Reads(ast.NodeVisitor):
    def __init__(self, skip_classes: set[str]) -> None:
        self.skip_classes = skip_classes
        self.pairs: set[tuple[str, str]] = set()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if node.name not in self.skip_classes:
            self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = _key_of(node.value)
        if owner is not None:
            self.pairs.add((owner, node.attr))
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        owner = _key_of(node.value)
        if owner is not None and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            self.pairs.add((owner, node.slice.value))
        self.generic_visit(node)


def _reads() -> set[tuple[str, str]]:
    config_classes = {cls.__name__ for cls in _sections().values()} | {"Config"}
    pairs: set[tuple[str, str]] = set()
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.suffix == ".py":
                visitor = _Reads(config_classes if rel in DECLARATIONS else set())
                visitor.visit(ast.parse(path.read_text(), filename=rel))
                pairs |= visitor.pairs
            elif path.is_file() and top == "launchers":
                pairs |= set(re.findall(r"\b(\w+)\.(\w+)\b", path.read_text()))
    return pairs


def test_every_config_key_is_read_outside_its_declaration() -> None:
    reads = _reads()
    unread = [key for key in _config_keys() if tuple(key.split(".")) not in reads and key not in CONSUMED_WHOLESALE]
    assert not unread, f"config keys nothing reads (delete them, or read them): {unread}"


def test_the_wholesale_list_is_honest() -> None:
    """Each listed key exists, has a reason, and is not read directly after all (else it should leave the list)."""
    reads = _reads()
    for key, reason in CONSUMED_WHOLESALE.items():
        assert key in _config_keys() and reason.strip(), key
        assert tuple(key.split(".")) not in reads, f"{key} is read directly: drop it from CONSUMED_WHOLESALE"


def test_the_walk_sees_reads_and_ignores_declarations() -> None:
    """The detector itself: a key read in code counts; one named only in validation or a string does not."""
    code = (
        "class TrainConfig:\n"
        "    def __post_init__(self):\n"
        "        check(self.lr > 0, 'train.lr', 'must be > 0')\n"
        "def use(cfg, raw):\n"
        "    train = cfg.train\n"
        "    log('train.steps')\n"
        "    return train.warmup_steps, cfg.run.seed, raw['data']['fps']\n"
    )
    visitor = _Reads({"TrainConfig"})
    visitor.visit(ast.parse(code))
    assert {("train", "warmup_steps"), ("run", "seed"), ("data", "fps")} <= visitor.pairs
    assert ("train", "lr") not in visitor.pairs and ("train", "steps") not in visitor.pairs
