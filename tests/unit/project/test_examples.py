"""examples/*.yaml: every PieDeployment is a spec the operator accepts, and its memory fits one GH200 node.

The apiserver side (OpenAPI + CEL of the CRD) is checked by tests/e2e/test_helm.py with `kubectl apply
--dry-run=server`; this is the operator side (pydantic, same defaults) and the sizing arithmetic, without a cluster.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from pie_operator.quantity import is_percent, parse_bytes
from pie_operator.spec import PieDeploymentSpec

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.yaml"))
GH200_HOST_MEMORY = 480 * 2**30  # LPDDR5X per GH200 superchip; a node's allocatable is somewhat less
KINDS = {"PieDeployment", "PersistentVolumeClaim"}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pieds(path: Path) -> list[dict[str, Any]]:
    return [d for d in docs(path) if d["kind"] == "PieDeployment"]


def test_the_expected_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"minimal.yaml", "llama3-8b-gh200.yaml", "opt-13b-adaptive.yaml",
                                         "static-expansion.yaml", "autoscaling.yaml"}
    names = [d["metadata"]["name"] for p in EXAMPLES for d in pieds(p)]
    assert len(names) == len(set(names)), names  # all of them can live in one namespace


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_a_valid_spec_that_fits_a_gh200(path: Path) -> None:
    assert {d["kind"] for d in docs(path)} <= KINDS and pieds(path), path.name
    for doc in pieds(path):
        assert doc["apiVersion"] == "pie.io/v1alpha1" and "namespace" not in doc["metadata"]
        spec = PieDeploymentSpec.model_validate(doc["spec"])
        mem = spec.memory
        cap = parse_bytes(mem.host_memory.max if mem.host_memory.max is not None else mem.host_memory.min)
        headroom = (math.ceil(cap * float(str(mem.headroom).rstrip("%")) / 100) if is_percent(mem.headroom)
                    else parse_bytes(mem.headroom))
        # The most host memory a pod of this spec can ask for: base + the pool's upper bound + its headroom.
        assert parse_bytes(mem.base) + cap + headroom < GH200_HOST_MEMORY, path.name
        if spec.model.source.pvc is not None:
            claims = {d["metadata"]["name"] for d in docs(path) if d["kind"] == "PersistentVolumeClaim"}
            assert spec.model.source.pvc.claim_name in claims, "the example ships the PVC it mounts"


def test_examples_cover_each_expansion_mode_the_docs_promise() -> None:
    by_name = {p.name: PieDeploymentSpec.model_validate(pieds(p)[0]["spec"]) for p in EXAMPLES}
    assert by_name["static-expansion.yaml"].memory.expansion.mode == "static"
    assert by_name["static-expansion.yaml"].memory.expansion.ratio == 2.0
    opt = by_name["opt-13b-adaptive.yaml"].memory
    assert opt.expansion.mode == "adaptive" and opt.host_memory.max is not None
    auto = by_name["autoscaling.yaml"].autoscaling
    assert auto.enabled and auto.max_replicas is not None and auto.max_replicas > auto.min_replicas
    llama = by_name["llama3-8b-gh200.yaml"]
    assert llama.model.dtype == "bfloat16" and llama.model.source.pvc is not None
