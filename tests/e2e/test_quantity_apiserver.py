"""The apiserver agrees with pie_engine.quantity: every form the parser accepts, Kubernetes reads as the same number
of bytes (a ResourceQuota's quantity, read back canonical), and the CRD accepts exactly the forms the parser accepts
(its pattern and CEL rules), for byte quantities and for GPU budgets. Server-side dry run: nothing is stored."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity as canonical_value

from pie_engine.quantity import MAX_BYTES, parse_budget, parse_bytes
from pie_operator.spec import GROUP, PLURAL, VERSION
from tests.cluster.cluster import Cluster
from tests.unit.engine.test_quantity import BUDGETS, BYTES, NEGATIVE, STRICTER, SUB_BYTE, SYNTAX, TOO_LARGE
from tests.unit.operator.test_spec import MINIMAL, spec_with

pytestmark = pytest.mark.e2e
NS = "default"


@pytest.fixture(scope="module")
def api(k8s: Cluster) -> Iterator[ApiClient]:
    client = kubernetes.config.new_client_from_config(str(k8s.kubeconfig))
    yield client
    client.close()


def apiserver_value(api: ApiClient, form: str) -> Decimal | tuple[int, str]:
    """The apiserver's reading of ``form`` as a memory quantity, or (HTTP status, message)."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q"},
             "spec": {"hard": {"requests.memory": form}}}
    try:
        got = CoreV1Api(api).create_namespaced_resource_quota(NS, quota, dry_run="All")
    except ApiException as e:
        return e.status, str(e.body)
    return canonical_value(got.spec.hard["requests.memory"])  # canonical: no syntax the client reads differently


def crd_verdict(api: ApiClient, spec: dict[str, Any]) -> str | None:
    """None if the apiserver accepts a PieDeployment with ``spec``, else its message."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PieDeployment", "metadata": {"name": "q"}, "spec": spec}
    try:
        CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body, dry_run="All")
    except ApiException as e:
        assert e.status == 422, e
        return str(e.body)
    return None


@pytest.mark.parametrize(("form", "kind"), BYTES.items())
def test_byte_quantities(api: ApiClient, form: str, kind: int | str) -> None:
    try:
        ours: int | None = parse_bytes(form)
    except ValueError:
        ours = None
    k8s = apiserver_value(api, form)
    if ours is not None:
        assert isinstance(k8s, Decimal) and math.ceil(k8s) == ours, k8s
    elif kind == SYNTAX:  # does not decode
        assert isinstance(k8s, tuple) and k8s[0] == 400 and "quantit" in k8s[1], k8s
    elif kind == NEGATIVE:  # decodes, fails validation
        assert isinstance(k8s, tuple) and k8s[0] == 422 and "must be greater than or equal to 0" in k8s[1], k8s
    elif kind == SUB_BYTE:
        # <= 1: a resource list rounds up to milli (SetDefaults_ResourceList), so 0.9999999 reads as 1 there; the
        # CRD's CEL rules see ParseQuantity's value (rounded up to nano only), as the parser does.
        assert isinstance(k8s, Decimal) and 0 < k8s <= 1, k8s
    elif kind == TOO_LARGE:
        assert isinstance(k8s, Decimal) and k8s > MAX_BYTES, k8s
    else:  # forms apimachinery takes although its documented grammar does not: documented in pie_engine.quantity
        assert kind == STRICTER and isinstance(k8s, Decimal), k8s
    for field in ("memory.hostMemory.max", "memory.base", "memory.headroom"):
        verdict = crd_verdict(api, spec_with(**{field: form}))
        assert (verdict is None) == (ours is not None), (field, verdict)
        if verdict is not None and kind in (SUB_BYTE, TOO_LARGE):
            assert "a byte quantity must be 0 or from 1 byte to 1Ei" in verdict, verdict


@pytest.mark.parametrize(("value", "ok"), [(0, True), (5, True), (MAX_BYTES, True), (MAX_BYTES + 1, False),
                                           (-1, False)])
def test_integer_byte_quantities(api: ApiClient, value: int, ok: bool) -> None:
    assert (crd_verdict(api, spec_with(**{"memory.hostMemory.max": value})) is None) == ok
    try:
        parse_bytes(value)
        assert ok
    except ValueError:
        assert not ok


@pytest.mark.parametrize("budget", BUDGETS)
def test_gpu_budgets(api: ApiClient, budget: str) -> None:
    try:
        parse_budget(budget)
        ours = True
    except ValueError:
        ours = False
    assert (crd_verdict(api, spec_with(**{"memory.gpuMemoryBudget": budget})) is None) == ours
    tuning = {"memory.tuning.gpuMemoryBudgetMin": budget, "memory.gpuMemoryBudget": "1"}
    assert (crd_verdict(api, spec_with(**tuning)) is None) == ours


def test_the_minimal_spec_is_accepted(api: ApiClient) -> None:
    assert crd_verdict(api, MINIMAL) is None  # else every rejection above could be for another reason


def test_random_forms(api: ApiClient) -> None:
    """Beyond the tables: strings over the quantity alphabet, the CRD's verdict always equals the parser's."""
    rnd = random.Random(13)
    alphabet = "0123456789.+-eEinumkKMGTP"
    forms = {"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 7))) for _ in range(150)}
    forms |= {rnd.choice(["", "+", "0", "1", "12", ".5", "3.", "1.25"]) + rnd.choice(["k", "Mi", "m", "e3", "E-2", "Ki",
                                                                                      "u", "Ei", "E", "e"])
              for _ in range(60)}
    disagree = []
    for form in sorted(forms):
        try:
            ours = parse_bytes(form) is not None
        except ValueError:
            ours = False
        if (crd_verdict(api, spec_with(**{"memory.hostMemory.max": form})) is None) != ours:
            disagree.append(form)
    assert disagree == []
