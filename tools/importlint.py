"""An import-linter contract type (pyproject's [tool.importlinter] `contract_types`): no module imports another
module's private name (`from engine.x import _helper`). A helper two modules share is made public instead.

Import-linter's own contracts see modules, not names, so this reads each module's `from ... import` statements
(function-level ones included). Dunder names (__version__) are not private.
"""
from __future__ import annotations

import ast
from pathlib import Path

from importlinter.application import output
from importlinter.domain.contract import Contract, ContractCheck


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _source(module: str) -> Path | None:
    base = Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    parent = parts if is_package else parts[:-1]
    parent = parent[:len(parent) - (node.level - 1)]
    return ".".join(parent + ([node.module] if node.module else []))


class PrivateNamesContract(Contract):
    """Broken by `from <internal module> import _name` in any other module of the root packages."""

    type_name = "private_names"

    def check(self, graph, verbose: bool) -> ContractCheck:
        violations = []
        for importer in sorted(graph.modules):
            path = _source(importer)
            if path is None or graph.is_module_squashed(importer):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                source = _absolute(importer, path.name == "__init__.py", node)
                if source == importer or source not in graph.modules:
                    continue
                for alias in node.names:
                    if _private(alias.name) and f"{source}.{alias.name}" not in graph.modules:
                        violations.append(f"{importer} (l.{node.lineno}) imports {source}.{alias.name}")
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(f"- {line}", bold=False)
            output.new_line()
