"""Sub-streams over data-parallel ranks (one process standing in for each rank): the union of the ranks' windows
is the one-process global batch for any dp and batch size, a rank tokenizes only its own documents, and a
position saved at one dp resumes at another."""

import json
import re

import pytest
import torch

from data import ConfigError, DataSource, RankStreams, build_tokenizer, check_streams
from data.documents import ShuffledDocuments, StreamedDocuments

SEQ_LEN = 16
STREAMS = 8
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
STEPS = [8, 8, 16, 24, 8]  # global windows per step: a batch-size change in the middle


class CountingTokenizer:
    """The shipped tokenizer, recording the number of every document it encodes ("doc<i>: ...")."""

    def __init__(self, tokenizer):
        self._tokenizer, self.eos_id, self.documents = tokenizer, tokenizer.eos_id, []

    def encode_batch(self, texts):
        self.documents += [int(re.match(r"doc(\d+):", t).group(1)) for t in texts]
        return self._tokenizer.encode_batch(texts)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    texts = [f"doc{i}: " + " ".join(WORDS[(i + j) % 8] for j in range(3 + (7 * i) % 40)) for i in range(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"source": "files", "path": str(path), "seed": 3, "streams": STREAMS}


def ranks(cfg, tokenizer, dp):
    source = DataSource(cfg, tokenizer, SEQ_LEN)
    return [RankStreams(source, dp, r) for r in range(dp)]


def global_steps(rank_streams, steps):
    """Every step's windows in global order, put together from the ranks (rank r holds g = r, r + dp, ...)."""
    dp, out = len(rank_streams), []
    for count in steps:
        mine = [r.read(count) for r in rank_streams]
        out.append([mine[g % dp][g // dp] for g in range(count)])
    return out


def assert_same_windows(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(x[key], y[key]) for key in ("input_ids", "labels", "cu_seqlens"))


def merged_state(rank_streams):
    """What `gather` makes of the ranks' positions over a process group."""
    states = [r.state_dict() for r in rank_streams]
    return {**states[0], "sub_streams": {k: v for s in states for k, v in s["sub_streams"].items()}}


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_union_of_ranks_is_the_one_process_global_batch(corpus, tokenizer, dp):
    single = global_steps(ranks(corpus, tokenizer, 1), STEPS)
    for want, got in zip(single, global_steps(ranks(corpus, tokenizer, dp), STEPS)):
        assert_same_windows(want, got)


def test_window_g_comes_from_sub_stream_g_mod_streams(corpus, tokenizer):
    source = DataSource(corpus, tokenizer, SEQ_LEN)
    alone = [source.stream(s) for s in range(STREAMS)]
    (step,) = global_steps(ranks(corpus, tokenizer, 1), [3 * STREAMS])
    assert_same_windows(step, [alone[g % STREAMS].next_window() for g in range(3 * STREAMS)])


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_a_rank_tokenizes_only_its_own_sub_streams(corpus, tokenizer, dp):
    counters = [CountingTokenizer(tokenizer) for _ in range(dp)]
    readers = [RankStreams(DataSource(corpus, counter, SEQ_LEN), dp, r) for r, counter in enumerate(counters)]
    global_steps(readers, STEPS)
    for r, counter in enumerate(counters):
        assert counter.documents and all(i % STREAMS % dp == r for i in counter.documents), (r, counter.documents)


@pytest.mark.parametrize("save_dp, resume_dp", [(2, 4), (4, 1), (1, 8), (8, 2)])
def test_saved_at_one_dp_resumes_at_another(corpus, tokenizer, save_dp, resume_dp):
    uninterrupted = global_steps(ranks(corpus, tokenizer, 1), STEPS)
    first = ranks(corpus, tokenizer, save_dp)
    global_steps(first, STEPS[:3])
    state = json.loads(json.dumps(merged_state(first)))  # a checkpoint holds plain data
    assert sorted(map(int, state["sub_streams"])) == list(range(STREAMS)) and state["windows"] == sum(STEPS[:3])
    resumed = ranks(corpus, tokenizer, resume_dp)
    for r in resumed:
        r.load_state_dict(state)
    for want, got in zip(uninterrupted[3:], global_steps(resumed, STEPS[3:])):
        assert_same_windows(want, got)


def test_position_does_not_depend_on_dp(corpus, tokenizer):
    states = []
    for dp in (1, 2, 4):
        readers = ranks(corpus, tokenizer, dp)
        global_steps(readers, STEPS)
        states.append(merged_state(readers))
    assert states[0] == states[1] == states[2]


def test_mixture_sub_streams_draw_their_own_sources(tmp_path, tokenizer):
    # every sub-stream holds short and long documents: 2 or 30 words by row of STREAMS documents
    texts = [f"doc{i}: " + " ".join(["word"] * (2 if i // STREAMS % 2 else 30)) for i in range(4 * STREAMS)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = {"source": "files", "path": str(tmp_path / "docs.jsonl"), "streams": STREAMS,
           "mixture": {"short": {"max_doc_tokens": 12, "weight": 1}, "long": {"min_doc_tokens": 12, "weight": 1}}}
    source = DataSource(cfg, tokenizer, SEQ_LEN)
    draws = []
    for s in range(STREAMS):
        stream = source.stream(s)
        draws.append([(stream.next_window(), stream.last_source)[1] for _ in range(12)])
    assert len({tuple(d) for d in draws}) == STREAMS  # not one draw sequence shared by all sub-streams
    assert 0.3 < sum(d.count("short") for d in draws) / (12 * STREAMS) < 0.7
    single = global_steps(ranks(cfg, tokenizer, 1), STEPS)
    for want, got in zip(single, global_steps(ranks(cfg, tokenizer, 4), STEPS)):
        assert_same_windows(want, got)


def test_map_style_parts_split_every_epoch(tokenizer):
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": [f"d{i}" for i in range(10)]})
    parts = [ShuffledDocuments(dataset, "text", seed=1, part=p, parts=3) for p in range(3)]
    for p, part in enumerate(parts):
        two_epochs = part.read(2 * part.part_documents)
        texts = [int(t[1:]) for _, _, t in two_epochs]
        first, second = texts[:part.part_documents], texts[part.part_documents:]
        assert sorted(first) == sorted(second) == list(range(p, 10, 3))
        assert [e for e, _, _ in two_epochs] == [0] * len(first) + [1] * len(second)


# whole shards per part, every parts-th document; and both through the seeded shuffle buffer
@pytest.mark.parametrize("files, parts, buffer", [(6, 3, 0), (1, 3, 0), (6, 3, 4), (1, 3, 4)])
def test_streamed_parts_split_every_epoch_of_the_stream(tmp_path, files, parts, buffer):
    from datasets import load_dataset

    rows = [[f"f{f}d{i}" for i in range(f * 10 // files, (f + 1) * 10 // files)] for f in range(files)]
    for f, texts in enumerate(rows):
        (tmp_path / f"{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data_files = sorted(str(p) for p in tmp_path.glob("*.jsonl"))
    stream = load_dataset("json", data_files=data_files, split="train", streaming=True)
    epochs = [[], []]
    for p in range(parts):
        read = StreamedDocuments(stream, "text", seed=5, shuffle_buffer=buffer, part=p, parts=parts).read(12)
        for epoch in (0, 1):  # 12 documents are more than two epochs of a part
            epochs[epoch] += [t for e, _, t in read if e == epoch]
    everything = sorted(t for texts in rows for t in texts)
    assert sorted(epochs[0]) == sorted(epochs[1]) == everything  # each epoch split over the parts, none twice


def test_bad_stream_settings(corpus, tokenizer):
    with pytest.raises(ConfigError, match=r"^data.streams=6 is not divisible by the data-parallel size 4 "):
        check_streams(6, 4)
    with pytest.raises(ConfigError, match=r"^data.streams: must be a positive integer, got 0$"):
        check_streams(0, 1)
    with pytest.raises(ConfigError, match=r"^data.streams=64: the corpus has only 40 documents"):
        DataSource({**corpus, "streams": 64}, tokenizer, SEQ_LEN)
    state = RankStreams(DataSource(corpus, tokenizer, SEQ_LEN)).state_dict()
    with pytest.raises(ValueError, match=r"^data.streams: the checkpoint's run read 8 sub-streams, this one 4"):
        RankStreams(DataSource({**corpus, "streams": 4}, tokenizer, SEQ_LEN)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^data: the checkpoint's data position predates data.streams"):
        RankStreams(DataSource(corpus, tokenizer, SEQ_LEN)).load_state_dict({"epoch": 0, "doc_index": 0})


def test_a_filter_no_document_of_a_sub_stream_passes_names_it(corpus, tokenizer):
    stream = DataSource({**corpus, "min_doc_tokens": 10**6}, tokenizer, SEQ_LEN).stream(5)
    with pytest.raises(ConfigError, match=r"^data.min_doc_tokens/max_doc_tokens: no document in sub-stream 5 "
                                          r"of data.streams=8 has a token count in \[1000000, None\)$"):
        stream.next_window()
