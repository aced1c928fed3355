"""Docs that are generated from a source of truth must not drift from it."""

import importlib.util
import re
from pathlib import Path

import pytest
from prometheus_client import Metric

REPO = Path(__file__).resolve().parents[3]


def test_crd_reference_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen", REPO / "docs" / "gen_crd_reference.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs" / "crd-reference.md").read_text() == gen.render(), (
        "docs/crd-reference.md is stale: run `python docs/gen_crd_reference.py`")


@pytest.fixture(scope="module")
def exported(tiny_model) -> list[Metric]:
    """Every metric family a real server exposes: the server's registry built the way server/app.py builds it,
    over a small real engine with adaptive expansion (so every Pie collector is there); and the operator's own
    (pie_operator.exporter, what `pie-operator run --metrics-port` serves)."""
    from pie_engine.config import EngineConfig
    from pie_engine.factory import create_engine
    from pie_engine.server.metrics import ServerMetrics
    from pie_operator.exporter import Exporter

    engine = create_engine(EngineConfig(model=str(tiny_model("llama")), device="cpu", dtype="float32",
                                        num_device_blocks=16, expansion="adaptive"))
    try:
        server = ServerMetrics(engine.stats, "tiny", extra_collectors=engine.metrics_collectors).registry.collect()
        return [*server, *Exporter().registry.collect()]
    finally:
        engine.kv_runtime.close()


def headline(family: Metric) -> str:
    """The name a reader queries: a counter's ``_total`` series, otherwise the family name."""
    return family.name + "_total" if family.type == "counter" else family.name


def documented_names() -> dict[str, list[str]]:
    """pie_* and vllm:* names in the README and docs/ -> the files naming them; module names are not metrics."""
    modules = {p.stem for p in REPO.rglob("*.py")} | {p.parent.name for p in REPO.rglob("__init__.py")}
    found: dict[str, list[str]] = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for name in set(_METRIC_NAME.findall(doc.read_text())) - modules:
            found.setdefault(name, []).append(str(doc.relative_to(REPO)))
    return found


_METRIC_NAME = re.compile(r"(?<![\w/.-])(pie_[a-z0-9_]+\*?|vllm:[a-z0-9_:]+\*?)")


def test_readme_documents_every_exported_metric(exported: list[Metric]) -> None:
    readme = (REPO / "README.md").read_text()
    names = sorted(headline(f) for f in exported)
    assert len(names) > 20, names  # the server's and Pie's metrics both came through
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing, f"README's metrics reference misses {missing}"


def test_every_documented_metric_is_exported(exported: list[Metric]) -> None:
    """Headline names, their series (``_sum``, ``_bucket``, ...) and ``prefix_*`` wildcards must match the code."""
    series = {headline(f) for f in exported} | {s.name for f in exported for s in f.samples}
    unknown = {name: docs for name, docs in documented_names().items()
               if not (any(s.startswith(name[:-1]) for s in series) if name.endswith("*") else name in series)}
    assert not unknown, f"documented but not exported: {unknown}"
