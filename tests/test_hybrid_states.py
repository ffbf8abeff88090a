"""Linear-attention (Gated DeltaNet) state groups without an engine.

Hits and loads against vLLM's own ``MambaManager`` (a real ``KVCacheManager``
allocating and handing over states), saves taken from vLLM's hand-off only,
the namespaces of state groups (and those of other engines unchanged), the
engines refused, and a worker moving state pages through vLLM's padded int8 views.
"""

import re

import pytest
import torch

pytest.importorskip("vllm")

from vllm_objects import (  # noqa: E402
    blocks,
    cached_requests,
    engine_configs,
    new_request,
    request,
    step,
)

from lmcache_fs.config import ConfigError, load_config  # noqa: E402
from lmcache_fs.connector import namespace  # noqa: E402
from lmcache_fs.connector.groups import describe_groups, geometry_of  # noqa: E402
from lmcache_fs.connector.scheduler import GroupIndexes, SchedulerSide  # noqa: E402
from lmcache_fs.connector.supported import check_supported  # noqa: E402
from lmcache_fs.storage.index import ChunkIndex  # noqa: E402
from lmcache_fs.storage.layout import ChunkLayout, Namespace  # noqa: E402
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import MambaManager  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

BLOCK, CHUNK = 16, 32  # two blocks per chunk: only a state at a chunk's end is a hit point
STATE, FULL = 0, 1  # vLLM orders Qwen3-Next's groups so: linear attention, then full


def _state_spec(**extra) -> MambaSpec:
    settings = {"mamba_type": MambaAttentionBackendEnum.GDN_ATTN, "mamba_cache_mode": "align",
                "shapes": ((3, 8), (2, 4, 4)), "dtypes": (torch.bfloat16, torch.float32), **extra}
    return MambaSpec(block_size=BLOCK, **settings)


def _full_spec(**extra) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.bfloat16,
                             **extra)


def _groups(*specs):
    return [KVCacheGroupSpec([f"model.layers.{g}.x"], spec) for g, spec in enumerate(specs)]


def _manager() -> KVCacheManager:
    """vLLM's own KV cache manager of a Qwen3-Next-like engine, keeping a state at every step's
    end (dense retention: which boundaries vLLM keeps is its choice, tested here as given)."""
    config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                           kv_cache_groups=_groups(_state_spec(), _full_spec()),
                           hash_block_size=BLOCK, prefix_cache_retention_interval=None)
    return KVCacheManager(config, max_model_len=1024, scheduler_block_size=BLOCK,
                          hash_block_size=BLOCK)


def _side(tmp_path):
    """The scheduler side of that engine, and the indexes of its state and full groups."""
    indexes = [ChunkIndex(ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": g})),
                          negative_ttl_s=0) for g in (STATE, FULL)]
    groups = [GroupIndexes(geometry_of(spec, CHUNK), [index])
              for spec, index in zip((_state_spec(), _full_spec()), indexes)]
    return SchedulerSide(groups, CHUNK, BLOCK, BLOCK, True, True), *indexes


def _request(req_id, num_tokens):
    return request(req_id, num_tokens, BLOCK)  # every request here: the same tokens


def _saves(meta):
    return sorted((op.group, op.chunk_index, op.block_ids) for op in meta.saves)


# -- hits ---------------------------------------------------------------------------------

def test_a_hit_needs_the_one_state_vllm_keeps_at_its_end_so_lands_on_chunk_ends():
    geometry = geometry_of(_state_spec(), CHUNK)
    assert geometry.kind == "state" and geometry.held_blocks == 1
    for hit in range(BLOCK, 12 * CHUNK, BLOCK):
        skipped = MambaManager.get_num_skipped_tokens(None, hit)  # vLLM's own count
        needed = geometry.needed_blocks(hit, 0)
        assert needed == range(skipped // BLOCK, hit // BLOCK) == range(hit // BLOCK - 1, hit // BLOCK)
        chunk = needed.start // (CHUNK // BLOCK)
        assert (needed.start >= geometry.first_held_block(chunk)) == (hit % CHUNK == 0)


def test_hits_land_on_chunk_ends_whose_state_is_stored_and_below_the_last_token(tmp_path):
    side, states, full = _side(tmp_path)
    exact = _request("exact", 4 * CHUNK)  # exactly four chunks
    keys = side.chunk_keys(exact, exact.num_tokens)
    for key in keys:
        full.add(key)
    # Attention KV without the state is never a hit (LMCache#2863: garbled output).
    assert side.get_num_new_matched_tokens(exact, 0) == 0
    states.add(keys[3])  # the state after every token: the last one must be computed
    assert side.get_num_new_matched_tokens(exact, 0) == 0
    states.add(keys[1])
    assert side.get_num_new_matched_tokens(exact, 0) == 2 * CHUNK  # the last state below it
    assert side.get_num_new_matched_tokens(exact, CHUNK) == CHUNK  # beyond the local prefix
    mid = _request("mid", 4 * CHUNK + 5)  # the same tokens, then five more: ends mid-chunk
    assert side.get_num_new_matched_tokens(mid, 0) == 4 * CHUNK
    states.discard(keys[3])  # a state file missing: the hit falls back to the one before
    assert side.get_num_new_matched_tokens(mid, 0) == 2 * CHUNK


# -- vLLM's manager: what it hands over is stored, what it allocates is loaded into --------

def test_saves_take_the_states_vllm_hands_over_and_loads_fill_the_one_block_it_allocates(tmp_path):
    side, states, full = _side(tmp_path)
    vllm = _manager()
    a = _request("a", 3 * CHUNK + 5)
    # Step 1: two chunks (align mode ends prefill steps on block boundaries).
    computed, local, _ = vllm.get_computed_blocks(a)
    vllm.allocate_slots(a, 2 * CHUNK, local, computed)
    assert side.get_num_new_matched_tokens(a, 0) == 0
    side.update_state_after_alloc(a, vllm.get_blocks("a"), 0)
    handed = vllm.take_boundary_state_offloads()
    (_, state_at_64, tokens), = handed["a"]
    table = vllm.get_block_ids("a")
    assert tokens == 2 * CHUNK and table[STATE] == [0, 0, 0, state_at_64]  # nulls below it
    meta = side.build_connector_meta(step([new_request(a, table, 0)], scheduled={"a": 2 * CHUNK},
                                          handed=handed))
    full_ids = table[FULL]
    # Every attention block; the one state vLLM kept (none at 32: no step ended there).
    assert _saves(meta) == [(STATE, 1, (state_at_64,)), (FULL, 0, tuple(full_ids[:2])),
                            (FULL, 1, tuple(full_ids[2:4]))]
    # Step 2: the third chunk, then the tail.
    a.num_computed_tokens = 2 * CHUNK
    more = vllm.allocate_slots(a, CHUNK).get_block_ids()
    handed = vllm.take_boundary_state_offloads()
    (_, state_at_96, _), = handed["a"]
    meta = side.build_connector_meta(step(cached=cached_requests(("a", 2 * CHUNK, more)),
                                          scheduled={"a": CHUNK}, handed=handed))
    assert _saves(meta) == [(STATE, 2, (state_at_96,)), (FULL, 2, tuple(more[FULL]))]
    keys = side.chunk_keys(a, 3 * CHUNK)
    for key in keys:
        full.add(key)
    for key in keys[1:]:
        states.add(key)

    # Another engine (its own vLLM) meets the prompt: an asynchronous load of three chunks.
    elsewhere = _manager()
    b = _request("b", 3 * CHUNK + 5)
    computed, local, _ = elsewhere.get_computed_blocks(b)
    hit = side.get_num_new_matched_tokens(b, local)
    assert (local, hit) == (0, 3 * CHUNK)
    elsewhere.allocate_slots(b, 0, local, computed, num_external_computed_tokens=hit,
                             delay_cache_blocks=True)
    allocated = elsewhere.get_blocks("b")  # what vLLM's scheduler hands the connector
    side.update_state_after_alloc(b, allocated, hit)
    state_blocks = allocated.blocks[STATE]
    real = [i for i, block in enumerate(state_blocks) if not block.is_null]
    assert real == [hit // BLOCK - 1]  # vLLM gives the state one block, at hit / B - 1
    loads = [(op.group, op.key, op.first_block, op.block_ids)
             for op in side.build_connector_meta(step()).loads]
    full_ids = [block.block_id for block in allocated.blocks[FULL]]
    assert loads == [(STATE, keys[2], 0, (state_blocks[real[0]].block_id,)),
                     (FULL, keys[0], 0, tuple(full_ids[0:2])),
                     (FULL, keys[1], 0, tuple(full_ids[2:4])),
                     (FULL, keys[2], 0, tuple(full_ids[4:6]))]


def test_a_state_save_takes_the_block_vllm_names_never_the_table_position_nor_its_null_block(
        tmp_path):
    # In align mode vLLM nulls, frees and moves a state group's blocks: the table entry at a
    # boundary may hold another block than the state, so only the hand-off names it.
    side, _, _ = _side(tmp_path)
    req = _request("r", 2 * CHUNK + 3)
    side.update_state_after_alloc(req, blocks([None, None, None, 7], [10, 11, 12, 13]), 0)
    meta = side.build_connector_meta(step([new_request(req, ([0, 0, 0, 7], [10, 11, 12, 13]), 0)],
                                          scheduled={"r": 2 * CHUNK},
                                          handed={"r": [(STATE, 0, CHUNK),  # the null block
                                                        (STATE, 42, 2 * CHUNK)]}))
    assert [(op.chunk_index, op.block_ids) for op in meta.saves if op.group == STATE] == [(1, (42,))]


def test_a_state_is_stored_when_handed_over_even_if_its_chunk_was_just_stored(tmp_path):
    # A first request keeps no state at its chunk ends (vLLM kept none); a second one with the
    # same prefix gets a state at 64 (a shared-prefix junction): it must not be skipped as a
    # chunk already on its way to disk, as vLLM hands it over only this once.
    side, _, _ = _side(tmp_path)
    first, second = _request("first", 2 * CHUNK + 3), _request("second", 2 * CHUNK + 3)
    for req in (first, second):
        side.update_state_after_alloc(req, blocks([None, None, None, 5], [1, 2, 3, 4]), 0)
    meta = side.build_connector_meta(step([new_request(first, ([0, 0, 0, 5], [1, 2, 3, 4]), 0)],
                                          scheduled={"first": 2 * CHUNK}, handed={}))
    assert _saves(meta) == [(FULL, 0, (1, 2)), (FULL, 1, (3, 4))]
    meta = side.build_connector_meta(step([new_request(second, ([0, 0, 0, 9], [1, 2, 3, 4]), 0)],
                                          scheduled={"second": 2 * CHUNK},
                                          handed={"second": [(STATE, 9, 2 * CHUNK)]}))
    assert _saves(meta) == [(STATE, 1, (9,))]


# -- namespaces ---------------------------------------------------------------------------

def _names(specs, tp_size=1, tp_rank=0, chunk_size=512) -> list[str]:
    configs = engine_configs(specs, tp_size)
    return [namespace.rank_namespace(namespace.namespace_fields(*configs, chunk_size, g),
                                     tp_rank, 0).name for g in range(len(specs))]


@pytest.fixture
def fixed_attention_layout(monkeypatch):
    # (the CPU attention layout names this machine's instruction set: fix it for the names)
    monkeypatch.setattr(namespace, "kv_layout_name", lambda *_: "cpu-vec")


def test_engines_without_states_keep_their_namespace_names(fixed_attention_layout):
    # Names computed by lmcache-fs at 80bd266, before state groups: files on disk stay valid.
    def attention(kind, **extra):
        return kind(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, **extra)

    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec

    hybrid = [attention(SlidingWindowSpec, sliding_window=256),
              attention(ChunkedLocalAttentionSpec, attention_chunk_size=384),
              attention(FullAttentionSpec)]
    assert _names([attention(FullAttentionSpec)]) == ["m-d4bdb4dfb0b5c62f"]
    assert _names(hybrid) == ["m-d23c731d50e3d445", "m-cffc560251c561ef", "m-929867e40e619b26"]


def test_state_namespaces_name_shapes_dtypes_conv_layout_alignment_block_and_rank(
        fixed_attention_layout, monkeypatch):
    from vllm.model_executor.layers.mamba import mamba_utils

    def names(state, **options):
        return _names([state, _full_spec()], **options)

    base = names(_state_spec())
    fields = namespace.namespace_fields(*engine_configs([_state_spec(), _full_spec()]), 512, STATE)
    assert (fields["state_shapes"], fields["state_dtypes"], fields["conv_state_layout"],
            fields["state_type"]) == ("3x8,2x4x4", "bfloat16,float32", "SD", "GDN_ATTN")
    aligned = _state_spec()
    object.__setattr__(aligned, "state_alignment", 64)  # vLLM 0.34's field
    variants = [names(_state_spec(shapes=((3, 8), (2, 8, 4)))),
                names(_state_spec(dtypes=(torch.bfloat16, torch.bfloat16))),  # (CPU: fp32 state)
                names(aligned), names(_state_spec(), tp_size=2), names(_state_spec(), tp_size=2,
                                                                        tp_rank=1)]
    monkeypatch.setattr(mamba_utils, "get_conv_state_layout", lambda: "DS")
    variants.append(names(_state_spec()))
    # Every variant changes both groups' names: attention files name the state geometry too.
    for name in variants:
        assert name[STATE] != base[STATE] and name[FULL] != base[FULL]
    assert len({name[STATE] for name in variants}) == len(variants)
    assert '"type":"MambaSpec"' in describe_groups([_state_spec(), _full_spec()], [1, 1], CHUNK)


# -- what is refused ----------------------------------------------------------------------

def _refusal(*specs, speculative=None) -> str:
    from types import SimpleNamespace

    with pytest.raises(ConfigError) as refused:
        check_supported(SimpleNamespace(kv_cache_groups=_groups(*specs)),
                        SimpleNamespace(pipeline_parallel_size=1), speculative)
    return str(refused.value)


def test_a_gated_deltanet_hybrid_in_align_mode_is_served():
    from types import SimpleNamespace

    check_supported(SimpleNamespace(kv_cache_groups=_groups(_state_spec(), _full_spec())),
                    SimpleNamespace(pipeline_parallel_size=1))


@pytest.mark.parametrize("specs, speculative, named", [
    ((_state_spec(mamba_cache_mode="all"), _full_spec()), None,
     "mamba_cache_mode 'align'.*has 'all'.*--mamba-cache-mode align"),
    ((_state_spec(mamba_cache_mode="none"), _full_spec()), None, "has 'none'"),
    ((_state_spec(mamba_type=MambaAttentionBackendEnum.MAMBA2), _full_spec()), None,
     "MAMBA2 state.*only Gated DeltaNet"),
    ((_state_spec(), _full_spec()), "ngram", "speculative decoding \\(method 'ngram'\\)"),
    ((_state_spec(),), None, "linear-attention layers alone"),
])
def test_states_that_could_not_be_exact_are_refused_with_the_reason(specs, speculative, named):
    from types import SimpleNamespace

    drafter = SimpleNamespace(method=speculative, uses_draft_kv_cache=lambda: False) \
        if speculative else None
    message = _refusal(*specs, speculative=drafter)
    assert re.search(named, message), message
    assert message.endswith("kv-transfer-config")


def test_a_chunk_size_that_does_not_fit_a_hybrid_s_large_block_names_the_value_to_use(tmp_path):
    # Real Qwen3.5 on CUDA: vLLM raises the attention block to 784-1056 tokens to hold a state.
    config = load_config({"storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="chunk_size 256 is not a multiple.*block size 1056: "
                                          "set chunk_size to e.g. 1056"):
        config.check_block_size(1056)
    load_config({"storage_path": str(tmp_path), "chunk_size": 2112}).check_block_size(1056)


# -- the worker: state pages through vLLM's padded int8 views -----------------------------

PAGE, CONTENT = 256, 176  # vLLM pads a state page to the attention page


def _state_views(layers: int, num_blocks: int = 12, fill: bool = False) -> list[torch.Tensor]:
    """Per-layer ``[blocks, 1, 1, CONTENT]`` int8 views with a ``PAGE`` stride, as vLLM
    registers a state group's layers (``create_kv_cache_views``)."""
    raw = torch.zeros(layers * num_blocks * PAGE, dtype=torch.int8)
    if fill:
        raw.random_(-128, 127)
    return [torch.as_strided(raw, (num_blocks, 1, 1, CONTENT), (PAGE, CONTENT, CONTENT, 1),
                             layer * num_blocks * PAGE) for layer in range(layers)]


def _state_worker(tmp_path, views, **settings):
    from lmcache_fs.connector.group_worker import GroupFiles, WorkerContext
    from lmcache_fs.connector.worker import WorkerSide
    from lmcache_fs.storage.store import ChunkStore

    config = load_config({"storage_path": str(tmp_path), "save_queue_size": 8, **settings})
    attention = torch.zeros(12, 2, BLOCK, 16, dtype=torch.bfloat16)
    groups = [GroupFiles(ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": 0}))),
                         ["s0", "s1"], 1, counts_tokens=False, holds_states=True),
              GroupFiles(ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": 1}))),
                         ["a0"], CHUNK // BLOCK)]
    worker = WorkerSide(WorkerContext(config, BLOCK, can_save=True), groups)
    worker.register_kv_caches({"s0": views[0], "s1": views[1], "a0": attention})
    return worker


@pytest.mark.parametrize("layerwise", [True, False])
def test_a_worker_moves_a_state_page_between_blocks_through_its_file(tmp_path, layerwise):
    from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp

    key = "cd" * 32
    source = _state_views(2, fill=True)
    saver = _state_worker(tmp_path, source, layerwise_load=layerwise)
    saver.save(LMCacheFSMetadata(saves=[SaveOp("a", key, "", 0, (3,), 0)]))
    saver.close()

    target = _state_views(2)
    loader = _state_worker(tmp_path, target, layerwise_load=layerwise)
    loader.load(LMCacheFSMetadata(loads=[LoadOp("b", key, 0, (9,), 0)], async_loads=["b"]))
    loader.save(LMCacheFSMetadata())
    results = loader.transfer_results()
    assert (results.finished_recving, results.failed_recving) == ({"b"}, set())
    for got, want in zip(target, source):
        assert torch.equal(got[9], want[3])
        assert not got[:9].any() and not got[10:].any()  # no other block written
    raw = target[0].as_strided((2 * 12 * PAGE,), (1,), 0)
    padding = raw.view(2 * 12, PAGE)[:, CONTENT:]
    assert not padding.any()  # nor the padding after a state
    loader.close()
