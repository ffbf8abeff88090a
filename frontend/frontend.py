"""lmcache-fs demo page: one long context, one question, every engine side by side.

    streamlit run frontend/frontend.py     # engines from $LMCACHE_FS_DEMO_CONFIG

Engines come from the demo config (see demo_config.py). The page measures
time to first token (TTFT) at the first streamed token of each engine, keeps a
history of TTFTs and cache hits for the session, and shows what the shared
cache directory holds when it can see it. After a first answer, a follow-up
turn continues the chat: its prompt carries the first exchange, so an engine
that did not answer the first turn loads that prefix from the shared directory.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import streamlit as st
from ask import EngineAnswer, ask_engines, ask_one
from cache_panel import summarize_cache, wait_for_new_chunks
from demo_config import (
    DemoConfigError,
    EngineConfig,
    SampleDocument,
    document_catalog,
    load_demo_config,
)
from engine_client import (
    EngineError,
    Health,
    ModelInfo,
    check_health,
    count_tokens,
    model_info,
    visible_text,
)

from lmcache_fs.log import human_bytes

PRIME_QUESTION = ""  # the prime request ends where every question begins


def tagged(context: str) -> str:
    """The context behind this session's fresh-copy tag, if one was made."""
    tag = st.session_state.get("context_tag")
    return f"[copy {tag}]\n{context}" if tag else context


def check_all(engines: tuple[EngineConfig, ...]) -> list[Health]:
    """Health of every engine, asked in parallel so one dead engine costs one timeout."""
    with ThreadPoolExecutor(max_workers=max(1, len(engines))) as pool:
        return list(pool.map(check_health, engines))


@st.cache_data(ttl=30, show_spinner=False)
def cached_model_info(engine: EngineConfig) -> ModelInfo:
    return model_info(engine)


@st.cache_data(ttl=3600, show_spinner=False, max_entries=64)
def cached_token_count(engine: EngineConfig, model: str, text: str) -> int:
    return count_tokens(engine, model, text)


@st.fragment(run_every="5s")
def engine_health(engines: tuple[EngineConfig, ...]) -> None:
    for engine, health in zip(engines, check_all(engines)):
        kind = "shared cache" if engine.uses_cache else "plain vLLM"
        badge = ":green-badge[up]" if health.ok else ":red-badge[down]"
        st.markdown(f"{badge} **{engine.label}** · {kind}")
        if not health.ok:
            st.caption(health.detail)


def choose_context(documents: list[SampleDocument]) -> tuple[str, str]:
    """The long context, and a question about it (the first sample question, if any)."""
    source = st.radio("Long context", ["Sample documents", "Paste text"], horizontal=True)
    if source == "Sample documents":
        by_title = {d.title: d for d in documents}
        names = st.multiselect("Documents (concatenated in this order)", list(by_title),
                               default=list(by_title)[:1])
        chosen = [by_title[n] for n in names]
        for document in chosen:
            with st.expander(f"{document.title}: source and questions"):
                st.caption(f"{document.source} · {document.license}")
                st.markdown("\n".join(f"- {q.question} *(the text says: {q.answer})*"
                                      for q in document.questions))
        question = chosen[0].questions[0].question if chosen else "What is this document about?"
        return "\n\n".join(d.text for d in chosen), question
    text = st.text_area("Paste a long text", height=200,
                        placeholder="A report, a contract, a chapter: several thousand tokens")
    return text, "What is this document about?"


def show_token_count(engines: tuple[EngineConfig, ...], context: str) -> None:
    """The context's real token count from the first engine that answers."""
    if not context.strip():
        st.info("Choose a document or paste some text.")
        return
    for engine in engines:
        try:
            info = cached_model_info(engine)
            tokens = cached_token_count(engine, info.id, context)
        except EngineError:
            continue
        limit = f" · the engines accept {info.max_model_len:,} per prompt" if info.max_model_len else ""
        st.markdown(f"Context: **{tokens:,} tokens** ({len(context):,} characters; "
                    f"tokenizer of {engine.label}){limit}")
        if info.max_model_len and tokens >= info.max_model_len:
            st.warning("This context is longer than the engines accept: they will refuse it.")
        return
    st.warning(f"Context: {len(context):,} characters; no engine answered to count its tokens.")


def prime_shared_cache(engine: EngineConfig, context: str, cache_dir: str) -> None:
    """Send the context alone to one cache engine so its chunks land in the shared directory."""
    before = summarize_cache(cache_dir).chunks if cache_dir else 0
    answer = ask_one(engine, context, PRIME_QUESTION, max_tokens=1)
    if answer.error:
        st.error(answer.error)
        return
    stored = ""
    if cache_dir and summarize_cache(cache_dir).visible:
        stored = f"; {wait_for_new_chunks(cache_dir, before)} new chunk files in the shared directory"
    st.success(f"{engine.label} read the context in {answer.ttft_s:.2f} s{stored}. Now ask a "
               "question: the other cache engines load these chunks, plain engines compute them.")


def render_answer(slot: st.delta_generator.DeltaGenerator, answer: EngineAnswer) -> None:
    """Draw one engine's column body (called again on every streamed change)."""
    with slot.container():
        if answer.ttft_s is not None:
            st.metric("TTFT", f"{answer.ttft_s:.3f} s")
        if answer.error:
            st.error(answer.error)
        elif answer.done:
            hits = ""
            if answer.shared_hit_tokens is not None:
                hits = (f" · {answer.shared_hit_tokens:,} tokens from the shared directory, "
                        f"{answer.local_hit_tokens:,} from its own prefix cache")
            st.caption(f"{answer.prompt_tokens or 0:,} prompt tokens · total "
                       f"{answer.total_s or 0:.2f} s{hits}")
        elif answer.ttft_s is None:
            st.caption("waiting for the first token …")
        if answer.text:
            st.text(visible_text(answer.text))


def show_answers(answers: list[EngineAnswer]) -> dict[str, st.delta_generator.DeltaGenerator]:
    """One column per engine: header and answer; returns the slot to redraw each answer in."""
    slots = {}
    for column, answer in zip(st.columns(len(answers)), answers):
        with column:
            st.subheader(answer.engine.label)
            st.caption("shared cache (lmcache-fs)" if answer.engine.uses_cache else "plain vLLM")
            slots[answer.engine.label] = st.empty()
        render_answer(slots[answer.engine.label], answer)
    return slots


def record_history(question: str, answers: list[EngineAnswer], turn: int = 1) -> None:
    history: list[dict] = st.session_state.setdefault("history", [])
    number = 1 + len({row["question"] for row in history})
    for a in answers:
        history.append({
            "question": f"Q{number}" + (" (follow-up)" if turn > 1 else ""), "asked": question,
            "engine": a.engine.label, "shared cache": a.engine.uses_cache,
            "TTFT (s)": None if a.error else a.ttft_s,
            "prompt tokens": a.prompt_tokens,
            "tokens from shared dir": a.shared_hit_tokens,
            "tokens from own prefix cache": a.local_hit_tokens,
            "status": a.error or "ok"})


def first_exchange(question: str, answers: list[EngineAnswer]) -> tuple[str, str, str] | None:
    """The first turn a follow-up continues: (question, answer, engine), taken from the first
    cache engine that answered (the one whose chunks the others can load), else any."""
    done = [a for a in answers if a.done and not a.error and a.text]
    done.sort(key=lambda a: not a.engine.uses_cache)
    return (question, done[0].text, done[0].engine.label) if done else None


def follow_up_turn(engines: tuple[EngineConfig, ...], context: str, max_tokens: int,
                   sequential: bool) -> None:
    """A second chat turn whose prompt carries the first exchange, on engines of one's choice."""
    earlier = st.session_state.get("first_exchange")
    if not earlier:
        return
    question, answer, engine_label = earlier
    st.header("Follow-up turn")
    st.caption(f"The follow-up's prompt begins with the whole first turn: the context, "
               f"{question!r} and {engine_label}'s answer. An engine that did not answer the "
               "first turn meets that prefix for the first time: with lmcache-fs it loads it "
               "from the shared directory, plain vLLM computes it.")
    asked = {a.engine.label for a in st.session_state.get("last_answers", [])}
    labels = [e.label for e in engines]
    fresh = [label for label in labels if label not in asked] or labels
    chosen = st.multiselect("Engines for the follow-up", labels, default=fresh)
    follow_up = st.text_input("Follow-up question", value="Explain that in one more sentence.")
    if st.button("Ask the follow-up", disabled=not (chosen and follow_up.strip())):
        targets = tuple(e for e in engines if e.label in chosen)
        slots = show_answers([EngineAnswer(e) for e in targets])
        answers = ask_engines(targets, tagged(context), follow_up, max_tokens, sequential,
                              on_update=lambda a: render_answer(slots[a.engine.label], a),
                              earlier=[(question, answer)])
        record_history(follow_up, answers, turn=2)
        st.session_state["follow_up_answers"] = answers
    elif st.session_state.get("follow_up_answers"):
        show_answers(st.session_state["follow_up_answers"])


def show_history() -> None:
    history = st.session_state.get("history", [])
    if not history:
        return
    st.header("TTFT per engine and question")
    table = pd.DataFrame(history)
    timed = table.dropna(subset=["TTFT (s)"])
    if not timed.empty:
        st.bar_chart(timed, x="question", y="TTFT (s)", color="engine", stack=False)
    st.dataframe(table, hide_index=True)


@st.fragment(run_every="10s")
def cache_panel(cache_dir: str) -> None:
    st.header("Shared cache directory")
    if not cache_dir:
        st.caption("No cache directory configured for this page.")
        return
    summary = summarize_cache(cache_dir)
    if not summary.visible:
        st.caption(f"{cache_dir} is not visible to this page.")
        return
    a, b, c = st.columns(3)
    a.metric("Chunk files", f"{summary.chunks:,}")
    b.metric("Bytes", human_bytes(summary.bytes))
    c.metric("Namespaces", len(summary.namespaces))
    if summary.namespaces:
        st.dataframe(pd.DataFrame([{"namespace": row.summary.name, "model": row.summary.model,
                                    "chunks": row.summary.chunks,
                                    "size": human_bytes(row.summary.bytes), "note": row.note}
                                   for row in summary.namespaces]),
                     hide_index=True)
    st.caption(f"{summary.root}")


def main() -> None:
    st.set_page_config(page_title="lmcache-fs: TTFT with a shared KV cache", layout="wide")
    try:
        config = load_demo_config()
    except DemoConfigError as exc:
        st.error(str(exc))
        st.stop()
    st.title("lmcache-fs: time to first token with a shared KV cache")
    st.caption("Engines with the lmcache-fs connector share one cache directory: a long context "
               "one of them has read is loaded by the others instead of being computed again.")
    if config.synthetic_model:
        st.warning("These engines serve a synthetic random-weight model: the answers are "
                   "meaningless (control characters are shown as symbols). Only the timings count.")

    with st.sidebar:
        st.header("Engines")
        engine_health(config.engines)
        selected = tuple(e for e in config.engines
                         if st.checkbox(f"Ask {e.label}", value=True, key=f"use-{e.label}"))
        max_tokens = st.slider("Answer length (tokens)", 1, 256, 32)
        sequential = st.checkbox("One engine at a time", value=config.sequential,
                                 help="Fair timings when engines share CPU cores; "
                                      "otherwise all engines are asked at once.")

    context, default_question = choose_context(document_catalog())
    show_token_count(config.engines, context)

    writer = next((e for e in config.engines if e.uses_cache), None)
    if writer and st.button(f"Store a fresh copy of the context in the shared cache "
                            f"(sent to {writer.label} only)", disabled=not context.strip(),
                            help="A random tag in front of the context makes it new to every "
                                 "engine: the next question then compares engines that load it "
                                 "from the shared directory with engines that compute it."):
        st.session_state["context_tag"] = uuid.uuid4().hex[:8]
        st.session_state.pop("first_exchange", None)  # a follow-up continues the new copy only
        with st.spinner(f"{writer.label} is reading the context …"):
            prime_shared_cache(writer, tagged(context), config.cache_dir)
    if st.session_state.get("context_tag"):
        st.caption(f"Questions use the fresh copy [{st.session_state['context_tag']}] of the "
                   "context: each engine meets it for the first time when first asked.")

    question = st.text_input("Question", value=default_question)
    ask = st.button("Ask the selected engines", type="primary",
                    disabled=not (context.strip() and question.strip() and selected))
    if ask:
        slots = show_answers([EngineAnswer(e) for e in selected])
        answers = ask_engines(selected, tagged(context), question, max_tokens, sequential,
                              on_update=lambda a: render_answer(slots[a.engine.label], a))
        record_history(question, answers)
        st.session_state["last_answers"] = answers
        st.session_state["first_exchange"] = first_exchange(question, answers)
        st.session_state.pop("follow_up_answers", None)
    elif st.session_state.get("last_answers"):
        show_answers(st.session_state["last_answers"])

    follow_up_turn(config.engines, context, max_tokens, sequential)

    show_history()
    cache_panel(config.cache_dir)


main()
