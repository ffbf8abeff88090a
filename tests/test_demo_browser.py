"""The local demo: the launcher's pieces, then end to end, where one launcher run (four real
CPU engines and the page) serves the headless TTFT comparison, the page in headless Chromium
and the Ctrl-C clean-up."""

from __future__ import annotations

import json
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import launcher as demo_launcher  # frontend/launcher.py (frontend/ is put on sys.path by demo_helpers)
import pytest
from demo_config import sample_documents
from demo_helpers import REPO, Launcher, pids_with_env
from page_in_browser import ask_on_the_page, check_side_by_side_answers

ARTIFACTS = REPO / "tests" / "artifacts"
RUN_MARKER = "LMCACHE_FS_DEMO_TEST_RUN"
START_AND_COMPARE_TIMEOUT_S = 900


def test_only_the_cache_engines_get_the_connector_and_they_share_one_directory(tmp_path: Path) -> None:
    kv = tmp_path / "kv"
    cached = demo_launcher.engine_command(tmp_path, demo_launcher.EngineSpec("a", "A", 1, True), kv)
    plain = demo_launcher.engine_command(tmp_path, demo_launcher.EngineSpec("c", "C", 2, False), kv)
    transfer = json.loads(cached[cached.index("--kv-transfer-config") + 1])
    assert transfer == {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"storage_path": str(kv)}}
    assert "--kv-transfer-config" not in plain
    assert cached[cached.index("--port") + 1] == "1" and "127.0.0.1" in cached


def test_a_local_model_folder_is_served_synthetic_asks_for_the_random_model_and_else_smollm2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import real_model
    import synthetic_model as synthetic

    monkeypatch.setattr(synthetic, "build_synthetic_model", lambda path: tmp_path / "random")
    monkeypatch.setattr(real_model, "build_real_model", lambda path, say: tmp_path / "smollm2")
    folder = tmp_path / "my-llama"
    folder.mkdir()
    assert demo_launcher.resolve_model(str(folder)) == (folder, False)
    (folder / synthetic.MARKER).write_text("{}")
    assert demo_launcher.resolve_model(str(folder)) == (folder, True)  # a synthetic folder says so
    assert demo_launcher.resolve_model("synthetic") == (tmp_path / "random", True)
    assert demo_launcher.resolve_model("mistralai/Mistral-7B-Instruct-v0.2") == (tmp_path / "smollm2", False)
    assert demo_launcher.resolve_model("") == (tmp_path / "smollm2", False)


def test_every_model_is_served_in_float32_by_default_and_the_synthetic_one_fits_byte_tokens(
        tmp_path: Path) -> None:
    # bf16 parted B's answer from the plain engines' in the default demo (GPL-2, "Who publishes
    # this license?"): float32 unless asked otherwise.
    spec = demo_launcher.EngineSpec("a", "A", 1, True)
    synthetic = demo_launcher.engine_command(tmp_path, spec, tmp_path, synthetic=True)
    real = demo_launcher.engine_command(tmp_path, spec, tmp_path)
    bf16 = demo_launcher.engine_command(tmp_path, spec, tmp_path, dtype="bfloat16")
    assert synthetic[synthetic.index("--dtype") + 1] == real[real.index("--dtype") + 1] == "float32"
    assert bf16[bf16.index("--dtype") + 1] == "bfloat16"
    longest = max(len(text.encode()) for text in sample_documents().values())
    assert int(synthetic[synthetic.index("--max-model-len") + 1]) > longest + 100
    assert real[real.index("--max-model-len") + 1] == "8192"


def test_the_kv_pool_holds_one_longest_prompt_of_the_served_model_and_dtype(tmp_path: Path) -> None:
    # SmolLM2's geometry: vLLM refuses to start where max_model_len tokens do not fit the pool.
    (tmp_path / "config.json").write_text(json.dumps({
        "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
        "num_hidden_layers": 30}))
    float32 = demo_launcher.kv_pool_bytes(tmp_path, "float32", 8192)
    assert float32 >= 8192 * 30 * 2 * 3 * 64 * 4 > demo_launcher.CPU_KV_CACHE_BYTES
    assert demo_launcher.kv_pool_bytes(tmp_path, "", 8192) == demo_launcher.CPU_KV_CACHE_BYTES
    assert demo_launcher.kv_pool_bytes(tmp_path / "missing", "float32", 8192) \
        == demo_launcher.CPU_KV_CACHE_BYTES


def test_the_table_gives_b_speedup_over_the_plain_median() -> None:
    row = lambda label, cache, ttft: demo_launcher.ComparisonRow(  # noqa: E731
        label, "r", cache, ttft, [100], [0], [0], True)
    table = demo_launcher.format_table([row("A", True, [2.0]), row("B", True, [0.1]),
                                        row("C", False, [1.0]), row("D", False, [3.0])])
    assert table.splitlines()[0].split()[:3] == ["engine", "role", "TTFT"]
    assert table.endswith("B vs plain vLLM on a prompt neither had seen: 20.0x faster to the first token")


@dataclass
class DemoRun:
    launcher: Launcher
    page_url: str
    rows: list[dict[str, Any]]
    engine_ports: list[int]
    marker: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """One launcher run for the whole module: comparison first, then the page stays up."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    workdir = tmp_path_factory.mktemp("demo")
    marker = uuid.uuid4().hex
    # The default dtype, as users get it (DTYPE unset): float32, where the comparison can
    # require A's answer from every engine token for token.
    launcher = Launcher(["--headless", "--keep-serving", "--rounds", "2", "--page-port", "0",
                         "--workdir", str(workdir), "--json", str(workdir / "comparison.json")],
                        ARTIFACTS / "demo-launcher.log", env={RUN_MARKER: marker, "DTYPE": ""})
    try:
        url = launcher.wait_for_line(r"Demo page: (http://\S+)", START_AND_COMPARE_TIMEOUT_S).group(1)
        ports = [int(m) for line in launcher.lines
                 for m in re.findall(r"ready at http://127\.0\.0\.1:(\d+)", line)]
        rows = json.loads((workdir / "comparison.json").read_text())
        yield DemoRun(launcher, url, rows, ports, marker)
    finally:
        launcher.interrupt()


@pytest.mark.engine
def test_headless_comparison_cached_engine_b_beats_plain_engines_on_a_prompt_only_a_served(
        demo: DemoRun) -> None:
    a, b, *plain = demo.rows
    assert (a["label"], b["label"]) == ("A · lmcache-fs", "B · lmcache-fs")
    assert [p["uses_cache"] for p in plain] == [False, False]
    # B met each prompt for the first time and loaded (nearly) all of it from A's chunks.
    assert b["local_hit_tokens"] == [0, 0]
    assert all(hits >= 0.8 * n for hits, n in zip(b["shared_hit_tokens"], b["prompt_tokens"]))
    assert a["shared_hit_tokens"] == [0, 0]
    # Plain engines met each prompt for the first time too: nothing reused, a full prefill.
    assert all(p["shared_hit_tokens"] == p["local_hit_tokens"] == [0, 0] for p in plain)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    plain_median = min(median(p["ttft_s"]) for p in plain)
    assert median(b["ttft_s"]) < 0.5 * plain_median, demo.rows
    # Loading A's KV must not change the answer: greedy tokens are identical everywhere.
    assert all(row["same_answer_as_writer"] for row in demo.rows)
    assert any("faster to the first token" in line for line in demo.launcher.lines)


@pytest.mark.engine
def test_browser_page_answers_side_by_side_then_a_follow_up_loads_the_first_turn(
        demo: DemoRun) -> None:
    """The first turn on A (which stored the context) and C; the follow-up, whose prompt
    carries the first exchange, on B and D, which meet it afresh: B loads it from the
    shared directory, D computes it."""
    check_side_by_side_answers(ask_on_the_page(demo.page_url, ARTIFACTS / "demo-page.png"))


@pytest.mark.engine
def test_ctrl_c_stops_every_process_the_launcher_started(demo: DemoRun) -> None:
    assert pids_with_env(RUN_MARKER, demo.marker), "the demo should be running before Ctrl-C"
    assert demo.launcher.interrupt() == 0
    assert pids_with_env(RUN_MARKER, demo.marker) == []
    page_port = urlparse(demo.page_url).port
    for port in [*demo.engine_ports, page_port]:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listening"
    assert "All demo processes stopped." in demo.launcher.lines
