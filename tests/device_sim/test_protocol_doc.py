"""docs/protocol.md stays in step with orchestrator/protocol.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.protocol import Desired, DeviceInfo, Report

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MODELS = {"Desired": Desired, "Report": Report, "DeviceInfo": DeviceInfo}
_BLOCK = re.compile(r"<!-- (schema|example): (\w+) -->\s*```json\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str, str]]:
    return [(m.group(1), m.group(2), m.group(3)) for m in _BLOCK.finditer(DOC.read_text())]


def test_schemas_match_models() -> None:
    schemas = {name: body for kind, name, body in _blocks() if kind == "schema"}
    assert set(schemas) == set(MODELS)
    for name, model in MODELS.items():
        assert json.loads(schemas[name]) == model.model_json_schema(), f"regenerate the {name} schema"


def test_examples_validate() -> None:
    examples = [(name, body) for kind, name, body in _blocks() if kind == "example"]
    assert {name for name, _ in examples} == set(MODELS)
    for name, body in examples:
        MODELS[name].model_validate_json(body)
