"""deploy/grafana/lmcache-fs-dashboard.json asks only for series that really exist.

Every PromQL expression of the dashboard is parsed (promql-parser, Prometheus'
grammar) and each selector's metric and label names are looked up in what the
two exporters register:
- the engine: vLLM's own PrometheusStatLogger, built by vLLM's code for an engine
  configured with the lmcache-fs connector (so it also builds our series through
  ``build_prom_metrics``), in a subprocess: the names a served engine's /metrics has;
- the directory: the registry of ``lmcache-fs gc --daemon --metrics-port``.
No Grafana here: a screenshot is not part of the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest
from cachedir import make_store, prefix_keys, save_prefix

from lmcache_fs.config import load_config
from lmcache_fs.ops.eviction import Evictor
from lmcache_fs.ops.exporter import DirectoryMetrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "lmcache-fs-dashboard.json"
# Grafana's variables, as Grafana substitutes them before sending a query.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$model_name": ".*"}

_ENGINE_SERIES = """
import json, sys
import prometheus_client
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.metrics.loggers import PrometheusStatLogger
config = EngineArgs(model=sys.argv[1], enforce_eager=True, max_model_len=2048, dtype="float32",
                    kv_transfer_config={"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": {"storage_path": sys.argv[2]}}
                    ).create_engine_config()
PrometheusStatLogger(config, engine_indexes=[0])
series = {}
for family in prometheus_client.REGISTRY.collect():
    for sample in family.samples:
        series.setdefault(sample.name, set()).update(sample.labels)
print("SERIES " + json.dumps({name: sorted(labels) for name, labels in series.items()}))
"""


def _series_of(registry) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture(scope="module")
def engine_series(synthetic_model, tmp_path_factory) -> dict[str, set[str]]:
    done = subprocess.run([sys.executable, "-c", _ENGINE_SERIES, str(synthetic_model),
                           str(tmp_path_factory.mktemp("kv"))],
                          capture_output=True, text=True, timeout=300, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SERIES ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-4000:]
    return {name: set(labels) for name, labels in json.loads(line[len("SERIES "):]).items()}


@pytest.fixture(scope="module")
def directory_series(tmp_path_factory) -> dict[str, set[str]]:
    root = tmp_path_factory.mktemp("kv")
    save_prefix(make_store(root), prefix_keys("p", 1))  # a namespace: its labelled series exist
    cfg = load_config({"storage_path": str(root), "max_disk_size_gb": 1})
    evictor = Evictor.from_config(cfg)
    metrics = DirectoryMetrics(cfg, evictor)
    metrics.observe(evictor.run_pass())  # the pass takes the lease: a holder is labelled
    evictor.close()
    return _series_of(metrics.registry)


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC, LABEL): as a selector
            metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
            exprs.append(f'{metric}{{{label}!=""}}')
    return exprs


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of each selector in a query."""
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[tuple[str, set[str]]] = []

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_the_dashboard_has_the_panels_the_issue_asks_for():
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Prompt tokens by source", "Load GB/s", "Load errors by reason",
            "Directory fill against the budget"} <= titles


def test_every_query_names_a_series_an_exporter_really_exports(engine_series, directory_series):
    exported = {**engine_series, **directory_series}
    queries = _queries()
    assert len(queries) > 20
    used = set()
    for expr in queries:
        selectors = _selectors(expr)
        assert selectors, expr
        for name, labels in selectors:
            assert name in exported, f"{name} (in {expr}) is exported by neither the engine nor gc"
            assert labels <= exported[name], f"{name} has no label {labels - exported[name]}"
            used.add(name)
    # Both sides are on the page: the engine's hits and ours, and the directory.
    assert {"vllm:prompt_tokens_cached_by_source_total", "vllm:lmcache_fs_loaded_bytes_total",
            "lmcache_fs_directory_bytes", "lmcache_fs_budget_bytes"} <= used


def test_the_lookup_sees_names_and_labels(engine_series):
    # The check above is not vacuous: a counter without _total, or a label it lacks, is caught.
    (name, labels), = _selectors('rate(vllm:lmcache_fs_loaded_bytes{reason="x"}[$__rate_interval])')
    assert name not in engine_series
    assert "reason" not in engine_series["vllm:lmcache_fs_loaded_bytes_total"]
    assert "reason" in engine_series["vllm:lmcache_fs_load_errors_total"]
