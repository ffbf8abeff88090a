"""Nodes' own disks as the shared cache: a GlusterFS volume, no metadata server, no cache server.

Two bricks in a ``distribute`` volume stand for two nodes' SSDs; engines A and B
each use their own client mount, as engines on two nodes would. B hits what A
wrote; one brick is killed while B serves (a node dies: its files answer ENOENT
or ENOTCONN at once), and B answers with plain vLLM's tokens within seconds;
the brick is started again and the hits come back. Chunk data lands on the
brick of its final name (the temporaries are named as rsync names them, which
GlusterFS places by the final name): no chunk needs two bricks alive.
"""

from __future__ import annotations

import random
import time

import pytest
from cachedir import wait_for_count
from engines import EngineProcess
from gluster import GlusterVolume, dht_pointers
from test_outage_engines import FAST_S, FULL_HIT, PROMPT_LEN, _chunk_files, _connector
from timed_answers import TimedAnswers

pytestmark = pytest.mark.engine

CHUNK = 256
_rng = random.Random(4242)


def _prompt() -> list[int]:
    return [_rng.randrange(3, 250) for _ in range(PROMPT_LEN)]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    gluster = GlusterVolume(tmp_path_factory.mktemp("gluster"), f"kv{int(time.time()) % 100000}")
    try:
        yield gluster
    finally:
        gluster.close()


def test_engines_on_two_clients_share_chunks_and_serve_through_a_dead_brick(
        synthetic_model, volume, artifacts_dir):
    engines = {}
    answers = TimedAnswers()
    try:
        engines["a"] = a = EngineProcess(synthetic_model, artifacts_dir / "gluster-a.log",
                                         _connector(volume.clients[0]))
        engines["b"] = b = EngineProcess(synthetic_model, artifacts_dir / "gluster-b.log",
                                         _connector(volume.clients[1]))
        prompts = [_prompt() for _ in range(3)]
        plain = [answers.ask(a, p, f"a prompt {i}")["token_ids"] for i, p in enumerate(prompts)]
        wait_for_count(lambda: _chunk_files(volume.clients[0]), 3 * (PROMPT_LEN // CHUNK))
        on_bricks = {brick: [p for p in brick.rglob("*.safetensors") if ".glusterfs" not in p.parts]
                     for brick in volume.bricks}
        assert all(on_bricks.values()), "distribute spreads the chunks over both bricks"
        assert [p for brick in volume.bricks for p in dht_pointers(brick)] == []
        for i, prompt in enumerate(prompts):
            hit = answers.ask(b, prompt, f"b prompt {i}")
            assert hit["num_cached_tokens"] >= FULL_HIT and hit["token_ids"] == plain[i]

        volume.kill_brick(0)
        b.reset_prefix_cache()
        for i, prompt in enumerate(prompts):
            out = answers.ask(b, prompt, f"b prompt {i}, brick 0 dead")
            assert out["token_ids"] == plain[i] and answers.seconds[f"b prompt {i}, brick 0 dead"] < FAST_S
        fresh = _prompt()
        fresh_b = answers.ask(b, fresh, "b fresh prompt, brick 0 dead")
        assert answers.seconds["b fresh prompt, brick 0 dead"] < FAST_S
        assert fresh_b["token_ids"] == answers.ask(a, fresh, "a fresh prompt")["token_ids"]

        volume.restart_bricks()
        for i, prompt in enumerate(prompts):
            again = answers.until_hit(b, prompt, f"b prompt {i}, brick 0 back", FULL_HIT)
            assert again["num_cached_tokens"] >= FULL_HIT and again["token_ids"] == plain[i]
        assert "Traceback" not in b.log_text()
    finally:
        for engine in engines.values():
            engine.close()
        answers.write(artifacts_dir / "gluster-times.json")
