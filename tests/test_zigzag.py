import pytest
import torch

from model.rope import positions_from_cu_seqlens
from parallel.zigzag import (
    check_window,
    describe_local_chunks,
    local_cu_seqlens,
    shard_batch,
    shard_window,
    unshard,
    zigzag_token_index,
)


def test_rank_holds_chunks_r_and_mirror():
    # T=16, CP=2 -> chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert zigzag_token_index(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_token_index(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("T, cp", [(12, 3), (16, 4), (8, 1)])
def test_shard_unshard_round_trip(T, cp):
    x = torch.arange(2 * T) * 10
    batch = {"input_ids": x, "labels": x + 1, "cu_seqlens": torch.tensor([0, 5, T, T + 3, 2 * T])}
    parts = [shard_batch(batch, T, r, cp) for r in range(cp)]
    assert torch.equal(unshard([p["input_ids"] for p in parts], T), x)
    assert torch.equal(unshard([p["labels"] for p in parts], T), x + 1)
    assert sorted(torch.cat([p["input_ids"] for p in parts]).tolist()) == x.tolist()
    assert all(p["num_tokens"] == 2 * T for p in parts)


def test_local_cu_seqlens_cut_at_chunk_edges_and_document_starts():
    cu = torch.tensor([0, 3, 9, 16])  # chunks of 4 (CP=2): [0,4) [4,8) [8,12) [12,16)
    assert local_cu_seqlens(cu, 16, 0, 2).tolist() == [0, 3, 4, 8]  # chunk 0 cut at 3; chunk 3 whole
    assert local_cu_seqlens(cu, 16, 1, 2).tolist() == [0, 4, 5, 8]  # chunk 1 whole; chunk 2 cut at 9 -> 5
    # a document starting exactly at a chunk edge adds no extra cut; empty documents add none
    assert local_cu_seqlens(torch.tensor([0, 4, 4, 16]), 16, 0, 2).tolist() == [0, 4, 8]


def test_positions_are_global_within_document():
    cu = torch.tensor([0, 3, 9, 16])
    local = shard_window(torch.arange(16), cu, 1, 2)
    full = positions_from_cu_seqlens(cu, 16)
    assert local["positions"].tolist() == full[4:12].tolist() == [1, 2, 3, 4, 5, 0, 1, 2]


def test_describe_local_chunks():
    cu = torch.tensor([0, 3, 9, 16])
    local = shard_window(torch.arange(16), cu, 1, 2)
    c1, c2 = describe_local_chunks(local["cu_seqlens"], local["positions"], 4, 1, 2)
    assert (c1.chunk, c1.start, c1.first_position, c1.first_segment_len, c1.has_document_start) == (1, 0, 1, 4, False)
    assert (c2.chunk, c2.start, c2.first_position, c2.first_segment_len, c2.last_segment_start) == (2, 4, 5, 1, 5)
    assert c2.has_document_start and (c2.first_segment, c2.last_segment) == (1, 2)


def test_bad_window_is_one_clear_line():
    with pytest.raises(ValueError, match=r"stage.seq_len=30 .* multiple of 2 \* context_parallel_size = 4") as err:
        check_window(30, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="stage.seq_len=30"):
        shard_window(torch.arange(30), torch.tensor([0, 30]), 0, 2)


def test_local_layout_contract_is_checked():
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ValueError, match="cut at every chunk edge"):
        describe_local_chunks(torch.tensor([0, 8]), positions, 4, 0, 2)
    with pytest.raises(ValueError, match="starts mid-document"):
        describe_local_chunks(torch.tensor([0, 2, 4, 8]), positions, 4, 0, 2)
