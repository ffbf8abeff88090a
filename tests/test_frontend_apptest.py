"""The demo page's logic and error handling, driven by Streamlit AppTest against fake engines."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import yaml
from ask import ask_engines  # noqa: E402  (frontend/, put on sys.path by demo_helpers)
from cache_panel import summarize_cache
from demo_config import (
    CONFIG_ENV,
    DemoConfigError,
    EngineConfig,
    document_catalog,
    parse_demo_config,
    sample_documents,
)
from demo_helpers import FRONTEND, FakeEngine, closed_port_url
from engine_client import metric_sum, visible_text
from streamlit.testing.v1 import AppTest

from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.manifest import write_manifest

FIRST_DOCUMENT = next(iter(sample_documents().values()))


@pytest.fixture()
def fakes() -> Iterator[dict[str, FakeEngine]]:
    engines = {"A": FakeEngine(answer="ok\x01", shared_hits=512),
               "C": FakeEngine(answer="ok\x01")}
    yield engines
    for engine in engines.values():
        engine.close()


def write_config(path: Path, engines: list[dict], **extra: object) -> Path:
    path.write_text(yaml.safe_dump({"engines": engines, **extra}))
    return path


def page(monkeypatch: pytest.MonkeyPatch, config: Path) -> AppTest:
    monkeypatch.setenv(CONFIG_ENV, str(config))
    app = AppTest.from_file(str(FRONTEND / "frontend.py"), default_timeout=30)
    app.run()
    assert not app.exception, app.exception
    return app


def button(app: AppTest, starts_with: str):
    (match,) = [b for b in app.button if b.label.startswith(starts_with)]
    return match


def all_text(app: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "error", "warning", "text", "info", "success"):
        parts += [str(e.value) for e in app.get(kind)]
    return "\n".join(parts)


@pytest.fixture()
def standard(tmp_path: Path, fakes: dict[str, FakeEngine]) -> Path:
    return write_config(tmp_path / "demo.yaml", [
        {"label": "A", "url": fakes["A"].url, "uses_cache": True},
        {"label": "C", "url": fakes["C"].url, "uses_cache": False}], synthetic_model=True)


def test_each_engine_shows_its_health_and_a_down_engine_says_why(
        tmp_path: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    down = closed_port_url()
    config = write_config(tmp_path / "demo.yaml", [
        {"label": "A", "url": fakes["A"].url, "uses_cache": True},
        {"label": "Down", "url": down}])
    app = page(monkeypatch, config)
    badges = [m.value for m in app.sidebar.markdown]
    assert badges == [":green-badge[up] **A** · shared cache", ":red-badge[down] **Down** · plain vLLM"]
    assert f"Down is not reachable at {down}: is the engine running?" in all_text(app)


@pytest.mark.parametrize("synthetic", [True, False])
def test_the_page_says_answers_are_meaningless_only_for_the_synthetic_model(
        tmp_path: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch,
        synthetic: bool) -> None:
    config = write_config(tmp_path / "demo.yaml", [{"label": "A", "url": fakes["A"].url}],
                          synthetic_model=synthetic)
    app = page(monkeypatch, config)
    assert ("answers are meaningless" in all_text(app)) is synthetic


def test_the_context_token_count_comes_from_the_engine_tokenizer(
        standard: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, standard)
    # The fake tokenizer counts one token per character.
    assert f"Context: **{len(FIRST_DOCUMENT):,} tokens**" in all_text(app)
    assert {"path": "/tokenize", "prompt": FIRST_DOCUMENT} .items() <= fakes["A"].requests[0].items()
    assert "the engines accept 8,192 per prompt" in all_text(app)


def test_a_context_longer_than_the_engines_accept_is_flagged_before_asking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = FakeEngine(max_model_len=1000)
    try:
        app = page(monkeypatch, write_config(tmp_path / "demo.yaml",
                                             [{"label": "A", "url": small.url}]))
        assert "longer than the engines accept" in all_text(app)
    finally:
        small.close()


def test_one_question_goes_to_every_engine_with_the_same_prompt(
        standard: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, standard)
    app.text_input[0].set_value("Who keeps the log?")
    button(app, "Ask the selected engines").click().run()
    assert not app.exception
    prompts = [engine.chats()[0]["messages"] for engine in fakes.values()]
    assert prompts[0] == prompts[1]
    assert prompts[0][0]["content"] == f"{FIRST_DOCUMENT}\n\nQuestion: Who keeps the log?"
    assert [m.label for m in app.metric if m.label == "TTFT"] == ["TTFT", "TTFT"]
    assert [t.value for t in app.text] == ["ok␁", "ok␁"]  # control characters made visible


def test_only_the_selected_engines_are_asked(
        standard: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, standard)
    app.sidebar.checkbox(key="use-C").uncheck().run()
    button(app, "Ask the selected engines").click().run()
    assert len(fakes["A"].chats()) == 1 and fakes["C"].chats() == []


def test_a_down_or_failing_engine_shows_a_message_and_the_others_still_answer(
        tmp_path: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    failing = FakeEngine(fail_with="This model's maximum context length is 8192 tokens.")
    try:
        config = write_config(tmp_path / "demo.yaml", [
            {"label": "A", "url": fakes["A"].url, "uses_cache": True},
            {"label": "Down", "url": closed_port_url()},
            {"label": "Failing", "url": failing.url}])
        app = page(monkeypatch, config)
        button(app, "Ask the selected engines").click().run()
        assert not app.exception
        errors = [e.value for e in app.error]
        assert any(e.startswith("Down is not reachable at") for e in errors), errors
        assert ("Failing rejected the request (HTTP 400): This model's maximum context length "
                "is 8192 tokens.") in errors
        assert [t.value for t in app.text] == ["ok␁"]
        assert "Traceback" not in all_text(app)
        statuses = {row["engine"]: row["status"] for row in app.session_state["history"]}
        assert statuses["A"] == "ok" and statuses["Failing"].startswith("Failing rejected")
    finally:
        failing.close()


def test_history_keeps_ttft_and_cache_hits_per_engine_and_question(
        standard: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, standard)
    button(app, "Ask the selected engines").click().run()
    app.text_input[0].set_value("And then?")
    button(app, "Ask the selected engines").click().run()
    history = app.session_state["history"]
    assert [(r["question"], r["engine"]) for r in history] == [
        ("Q1", "A"), ("Q1", "C"), ("Q2", "A"), ("Q2", "C")]
    assert [r["tokens from shared dir"] for r in history] == [512, 0, 512, 0]
    assert all(0 < r["TTFT (s)"] < 10 for r in history)
    assert len(app.get("vega_lite_chart")) == 1  # the TTFT chart
    # The last answers stay on the page across reruns that ask nothing.
    app.run()
    assert [t.value for t in app.text] == ["ok␁", "ok␁"]


def test_a_fresh_copy_goes_to_the_writer_only_and_questions_then_share_its_prefix(
        standard: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, standard)
    button(app, "Store a fresh copy").click().run()
    assert not app.exception
    (prime,) = fakes["A"].chats()
    assert fakes["C"].chats() == [] and prime["max_tokens"] == 1
    stored = prime["messages"][0]["content"]
    assert stored.startswith("[copy ") and FIRST_DOCUMENT in stored
    button(app, "Ask the selected engines").click().run()
    for engine in fakes.values():
        asked = engine.chats()[-1]["messages"][0]["content"]
        assert asked.startswith(stored) and asked != stored


def test_cache_panel_counts_published_chunks_and_bytes_per_namespace(
        tmp_path: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "kv"
    layout = ChunkLayout(cache, Namespace({"model": "org/Tiny", "block_size": 16}))
    write_manifest(layout)
    for i in range(3):
        path = layout.chunk_path(f"{i:02x}" * 16)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    (layout.chunk_path("00" * 16).parent / ".tmp.123.partial").write_bytes(b"y" * 5000)  # not counted
    (cache / "not-a-namespace").mkdir()
    config = write_config(tmp_path / "demo.yaml", [{"label": "A", "url": fakes["A"].url}],
                          cache_dir=str(cache))
    app = page(monkeypatch, config)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics == {"Chunk files": "3", "Bytes": "3 KB", "Namespaces": "1"}


def test_a_namespace_whose_manifest_does_not_match_its_name_is_not_counted(tmp_path: Path) -> None:
    layout = ChunkLayout(tmp_path, Namespace({"model": "org/Tiny"}))
    write_manifest(layout)
    (layout.directory / "namespace.json").write_text('{"model": "org/Other"}')
    (row,) = summarize_cache(tmp_path).namespaces
    assert row.summary.chunks == 0 and "does not match" in row.note


def test_an_invisible_cache_dir_is_reported_not_raised(
        tmp_path: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "demo.yaml", [{"label": "A", "url": fakes["A"].url}],
                          cache_dir=str(tmp_path / "missing"))
    app = page(monkeypatch, config)
    assert "is not visible to this page" in all_text(app)


def test_a_bad_config_file_shows_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, write_config(tmp_path / "demo.yaml", []))
    assert [e.value for e in app.error] == [
        f"{tmp_path / 'demo.yaml'}: 'engines' must be a non-empty list of {{label, url, uses_cache}} entries"]


@pytest.mark.parametrize("data, message", [
    ({"engines": [{"label": "A", "url": "engine-a:8000"}]}, "must start with http"),
    ({"engines": [{"label": "A", "url": "http://a"}, {"label": "A", "url": "http://b"}]}, "unique"),
    ({"engines": [{"label": "A", "url": "http://a"}], "cache": "/kv"}, "unknown key"),
])
def test_config_errors_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(DemoConfigError, match=message):
        parse_demo_config(data)


def test_one_engine_at_a_time_never_overlaps_requests() -> None:
    delay = 1.5  # each answer takes this long: long enough to see overlap on a busy machine
    slow = [FakeEngine(delay_s=delay), FakeEngine(delay_s=delay)]
    try:
        engines = [EngineConfig(f"E{i}", e.url) for i, e in enumerate(slow)]
        answers = ask_engines(engines, "ctx", "q?", 4, sequential=True, on_update=lambda a: None)
        assert [a.error for a in answers] == ["", ""]
        first, second = slow[0].chats()[0], slow[1].chats()[0]
        assert second["t_start"] >= first["t_start"] + delay  # after the first answered
        ask_engines(engines, "ctx", "q?", 4, sequential=False, on_update=lambda a: None)
        first, second = slow[0].chats()[1], slow[1].chats()[1]
        assert abs(second["t_start"] - first["t_start"]) < delay  # before the other answered
    finally:
        for engine in slow:
            engine.close()


@pytest.mark.parametrize("typed", [False, True])
def test_metrics_are_summed_over_label_sets_and_control_characters_made_visible(typed: bool) -> None:
    # vLLM declares its counters (# TYPE): the family is then named without _total
    declared = "# TYPE vllm:prefix_cache_hits counter\n" if typed else ""
    text = (f'# HELP x\n{declared}vllm:prefix_cache_hits_total{{engine="0"}} 5.0\n'
            'vllm:prefix_cache_hits_total{engine="1"} 7.0\nvllm:prefix_cache_hits_created 9\n')
    assert metric_sum(text, "vllm:prefix_cache_hits_total") == 12.0
    assert visible_text("a\x01\nb\x7f") == "a␁\nb␡"


def test_a_follow_up_turn_carries_the_first_exchange_to_the_engines_that_had_not_answered(
        standard: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, standard)
    app.sidebar.checkbox(key="use-C").uncheck().run()  # the first turn on A only
    app.text_input[0].set_value("Who publishes this license?")
    button(app, "Ask the selected engines").click().run()
    assert fakes["C"].chats() == []
    (chosen,) = [m for m in app.multiselect if m.label == "Engines for the follow-up"]
    assert chosen.value == ["C"]  # by default: the engines that meet the first turn afresh
    (follow_up_input,) = [t for t in app.text_input if t.label == "Follow-up question"]
    follow_up_input.set_value("Since when?")
    button(app, "Ask the follow-up").click().run()
    assert not app.exception
    (follow_up,) = fakes["C"].chats()
    assert follow_up["messages"] == [
        {"role": "user", "content": f"{FIRST_DOCUMENT}\n\nQuestion: Who publishes this license?"},
        {"role": "assistant", "content": "ok\x01"},
        {"role": "user", "content": "Since when?"}]
    assert [r["question"] for r in app.session_state["history"]] == ["Q1", "Q2 (follow-up)"]
    assert [t.value for t in app.text] == ["ok␁", "ok␁"]  # turn one's answer and the follow-up's


def test_a_real_model_page_shows_the_documents_sample_questions(
        tmp_path: Path, fakes: dict[str, FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    app = page(monkeypatch, write_config(tmp_path / "demo.yaml",
                                         [{"label": "A", "url": fakes["A"].url}]))
    first = document_catalog()[0]
    assert app.text_input[0].value == first.questions[0].question
    assert "answers are meaningless" not in all_text(app)
    assert f"the text says: {first.questions[0].answer}" in all_text(app)


def test_every_sample_document_names_its_source_license_and_questions() -> None:
    documents = document_catalog()
    assert len(documents) >= 3
    for document in documents:
        assert document.source and document.license and document.questions
        assert len(document.text) > 15_000  # about 4k tokens or more of English
