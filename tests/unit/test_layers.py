"""The package layering of ``orchestrator``: the engine below services, ingest and the API, no cycles,
and no Celery application built outside worker and beat processes."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "orchestrator"


def _imports() -> dict[str, set[str]]:
    """Module -> orchestrator modules it imports anywhere (function-level imports included)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n.startswith("orchestrator")}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


# What each layer may import besides the shared domain modules (models, state machines, ...).
ALLOWED = {
    "engine": set(),
    "services": {"engine"},
    "ingest": {"engine"},
    "api": {"services", "engine", "ingest", "embedded"},
    "worker": {"engine"},
    "embedded": set(),
    "cli": {"api", "services", "engine", "embedded", "worker", "ingest", "local_stack", "supervisor"},
}
UPPER = set(ALLOWED)


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, targets in _imports().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue
        for target in targets:
            other = _layer(target)
            if other != layer and other in UPPER and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles_between_layers() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        for target in targets:
            a, b = _layer(module), _layer(target)
            if a != b:
                edges[a].add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(a for a in list(edges) if reaches(a, a, {a}))
    assert not cycles, f"layers on an import cycle: {cycles}; edges: {dict(edges)}"


def test_api_ingest_and_cli_build_no_celery_app() -> None:
    code = (
        "import sys, celery._state as state\n"
        "import orchestrator.api.app, orchestrator.ingest.service, orchestrator.cli.main\n"
        "import orchestrator.services.rollout_service, orchestrator.engine.client\n"
        "print(len(list(state._apps)), 'orchestrator.worker' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr
