"""Indexed corpora (data.prepare -> data.source: indexed): the prepared corpus is the source tokenized with EOS, and
its windows are the on-the-fly stream's token for token (the same document order by design: one permutation
function for both); blends by weight, resumption, sub-streams over DP ranks, files of megatron-core's own builder,
and one-line errors."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from test_data_streams import assert_same_windows, global_steps, merged_state

from data import ConfigError, DataSource, RankStreams, build_tokenizer
from data.indexed import megatron_indexed
from data.prepare import main as prepare

SEQ_LEN = 32
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


@pytest.fixture(scope="module")
def texts():
    """Short and long documents (up to several windows), and an empty one."""
    texts = [f"doc{i}: " + " ".join(WORDS[(i + j) % 8] for j in range(2 + (11 * i) % 37 + 60 * (i % 9 == 0)))
             for i in range(40)]
    texts[7] = ""
    return texts


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, jsonl):
    """Three shards written by two worker processes."""
    out = tmp_path_factory.mktemp("prepared") / "web"
    assert prepare(["data=files", f"data.path={jsonl}", f"out={out}", "data.prepare.workers=2",
                    "data.prepare.shards=3"]) == 0
    return out


def files_cfg(jsonl, **extra):
    return {"source": "files", "path": str(jsonl), **extra}


def indexed_cfg(path, **extra):
    return {"source": "indexed", "path": path if path is None or isinstance(path, list) else str(path), **extra}


def build(prefix, documents, dtype=np.uint16):
    """A corpus written with megatron-core's builder, as Megatron-LM's preprocess_data.py does."""
    indexed = megatron_indexed()
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def read_documents(prefix):
    dataset = megatron_indexed().IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_prepare_writes_every_document_with_eos_in_order(prepared, texts, tokenizer):
    shards = [f"{prepared}-{k:05d}-of-00003" for k in range(3)]
    documents = [doc for shard in shards for doc in read_documents(shard)]
    assert documents == [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    assert documents[7] == [tokenizer.eos_id]  # an empty document stays, so document i is row i
    assert megatron_indexed().IndexedDataset(shards[0]).index.dtype == np.uint16  # Megatron's choice for 4K ids


BUCKETS = {"short": {"max_doc_tokens": 20, "weight": 0.4}, "long": {"min_doc_tokens": 20, "weight": 0.6}}


@pytest.mark.parametrize("extra", [{"seed": 0, "streams": 1}, {"seed": 3, "streams": 4, "min_doc_tokens": 4,
                                                                 "max_doc_tokens": 40}, {"streams": 2, "shuffle": False},
                                   {"seed": 1, "streams": 2, "mixture": BUCKETS}])
def test_indexed_windows_equal_the_on_the_fly_stream(prepared, jsonl, tokenizer, extra):
    on_the_fly = DataSource(files_cfg(jsonl, **extra), tokenizer, SEQ_LEN)
    indexed = DataSource(indexed_cfg(prepared, **extra), tokenizer, SEQ_LEN)
    for part in range(extra["streams"]):
        want, got = on_the_fly.stream(part), indexed.stream(part)
        assert_same_windows([want.next_window() for _ in range(100)], [got.next_window() for _ in range(100)])
        assert got.state_dict() == want.state_dict()  # the same position, past the first epoch
        assert "mixture" in extra or got.state_dict()["epoch"] >= 1


def test_prepare_resumes_keeping_finished_shards(prepared, jsonl, tmp_path, capsys):
    out = tmp_path / "web"
    for path in prepared.parent.iterdir():
        shutil.copy2(path, tmp_path / path.name)
    done = [os.stat(f"{out}-{k:05d}-of-00003.idx").st_mtime_ns for k in (0, 2)]
    os.remove(f"{out}-00001-of-00003.idx")  # interrupted between the two renames, with a partial file left over
    (tmp_path / "web-00001-of-00003.partial.bin").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"^data.path: .* holds 2 of the 3 shards of .*web-"):
        DataSource(indexed_cfg(out), build_tokenizer("default"), SEQ_LEN)
    args = ["data=files", f"data.path={jsonl}", f"out={out}", "data.prepare.workers=1"]
    assert prepare(args) == 0
    assert "3 shards (1 written now)" in capsys.readouterr().out
    assert [os.stat(f"{out}-{k:05d}-of-00003.idx").st_mtime_ns for k in (0, 2)] == done
    for k in range(3):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"web-{k:05d}-of-00003{ext}").read_bytes() == \
                (prepared.parent / f"web-{k:05d}-of-00003{ext}").read_bytes()
    assert prepare([*args, "data.prepare.shards=2"]) == 2
    assert prepare([*args, "data.sample_by=line"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("error: data.prepare.shards=2: ") and "data.prepare.shards=3" in errors[0]
    assert errors[1].startswith("error: out: ") and "(data.sample_by='document', now 'line')" in errors[1]


def test_prepare_a_streamed_corpus(jsonl, texts, tokenizer, tmp_path, capsys):
    out = tmp_path / "streamed"
    assert prepare(["data=files", f"data.path={jsonl}", "data.streaming=true", f"out={out}/",
                    "data.prepare.workers=1", "data.prepare.shards=2"]) == 0
    assert re.search(r"with 1 worker\(s\); per worker [\d,]+ tokens/s", capsys.readouterr().out)
    documents = [d for k in range(2) for d in read_documents(out / f"{k:05d}-of-00002")]
    # one file, two shards: every other document each, so the same documents in another order
    assert sorted(documents) == sorted(tokenizer.encode(t) + [tokenizer.eos_id] for t in texts)


A_IDS, B_IDS = range(10, 100), range(100, 200)


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, tokenizer):
    root, rng = tmp_path_factory.mktemp("blend"), np.random.default_rng(0)
    eos = tokenizer.eos_id
    prefixes = []
    for name, ids in (("a", A_IDS), ("b", B_IDS)):
        docs = [[*rng.integers(ids.start, ids.stop, rng.integers(1, 40)), eos] for _ in range(50)]
        prefixes.append(build(root / name, docs))
    return prefixes


@pytest.mark.parametrize("form", ["string", "list"])
def test_blend_draws_windows_by_weight(two_corpora, tokenizer, form):
    a, b = two_corpora
    path = f"0.7 {a} 0.3 {b}" if form == "string" else [0.7, a, "0.3", b]
    stream = DataSource(indexed_cfg(path, streams=1), tokenizer, 16).stream(0)
    n, from_a = 2000, 0
    for _ in range(n):
        ids = stream.next_window()["input_ids"]
        body = ids[ids != tokenizer.eos_id]
        in_a = bool(((body >= A_IDS.start) & (body < A_IDS.stop)).all())
        assert in_a or bool(((body >= B_IDS.start) & (body < B_IDS.stop)).all())  # whole from one corpus
        from_a += in_a
    assert abs(from_a - 0.7 * n) < 4 * (n * 0.7 * 0.3) ** 0.5


@pytest.mark.parametrize("blend", [False, True])
def test_resume_mid_epoch_at_another_dp_gives_the_same_next_windows(prepared, two_corpora, tokenizer, blend):
    cfg = indexed_cfg(f"0.5 {two_corpora[0]} 0.5 {prepared}" if blend else prepared, seed=5, streams=4,
                      min_doc_tokens=3)
    steps = [4, 8, 4, 8, 12]
    uninterrupted = global_steps([RankStreams(DataSource(cfg, tokenizer, SEQ_LEN), 1, 0)], steps)
    first = [RankStreams(DataSource(cfg, tokenizer, SEQ_LEN), 2, r) for r in range(2)]
    global_steps(first, steps[:3])
    state = json.loads(json.dumps(merged_state(first)))
    resumed = [RankStreams(DataSource(cfg, tokenizer, SEQ_LEN), 4, r) for r in range(4)]
    for r in resumed:
        r.load_state_dict(state)
    for want, got in zip(uninterrupted[3:], global_steps(resumed, steps[3:])):
        assert_same_windows(want, got)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_union_over_dp_ranks_is_the_one_process_global_batch(prepared, tokenizer, dp):
    cfg = indexed_cfg(prepared, seed=1, streams=4)
    single = global_steps([RankStreams(DataSource(cfg, tokenizer, SEQ_LEN), 1, 0)], [8, 4, 12])
    ranks = [RankStreams(DataSource(cfg, tokenizer, SEQ_LEN), dp, r) for r in range(dp)]
    assert all(sorted(r.streams) == list(range(r.dp_rank, 4, dp)) for r in ranks)  # each reads its own only
    for want, got in zip(single, global_steps(ranks, [8, 4, 12])):
        assert_same_windows(want, got)


def test_a_corpus_of_megatrons_own_builder_loads(tmp_path, tokenizer):
    eos, indexed = tokenizer.eos_id, megatron_indexed()
    first = build(tmp_path / "first", [[5, 6, 7, eos], [8, eos]], dtype=np.int32)
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "merged.bin"), dtype=np.int32)
    builder.add_index(first)  # merging shards, as preprocess_data.py does with several workers
    builder.add_item(torch.tensor([9, 10]))  # a document of two sequences (--split-sentences)
    builder.add_item(torch.tensor([11, eos]))
    builder.end_document()
    builder.add_document(torch.tensor([12, 13, eos]), [3])
    builder.finalize(str(tmp_path / "merged.idx"))
    stream = DataSource(indexed_cfg(tmp_path / "merged", shuffle=False, streams=1), tokenizer, 6).stream(0)
    window = stream.next_window()
    assert window["input_ids"].tolist() == [5, 6, 7, eos, 8, eos]
    assert window["cu_seqlens"].tolist() == [0, 4, 6] and window["labels"].tolist() == [6, 7, eos, -100, eos, -100]
    assert stream.next_window()["input_ids"].tolist() == [9, 10, 11, eos, 12, 13]
    with pytest.raises(ConfigError, match=r"^data.path: document 0 of .*no_eod does not end with EOS .*append-eod"):
        DataSource(indexed_cfg(build(tmp_path / "no_eod", [[5, 6, 7], [8, 9]])), tokenizer, 6)


def bad_corpora(root, eos):
    empty = build(root / "empty", [])
    build(root / "short", [[5, eos], [6, 7, eos]])
    with open(root / "short.bin", "r+b") as f:
        f.truncate(4)
    (root / "garbage.idx").write_bytes(b"not an index")
    (root / "garbage.bin").write_bytes(b"\0" * 8)
    return {
        "missing prefix": ("/no/such/prefix", r"^data.path: /no/such/prefix: no indexed corpus there"),
        "not set": (None, r"^data.path: not set"),
        "weights not summing to 1": (f"0.7 {empty} 0.2 {empty}x",
                                     r"^data.path: the weights .* sum to 1, got 0.7, 0.2 \(sum 0.9\)$"),
        "negative weight": (f"1.5 {empty} -0.5 {empty}x", r"^data.path: the weights must be non-negative"),
        "weight without prefix": (f"0.7 {empty} 0.3", r"^data.path: expected prefixes or pairs of weight and prefix"),
        "prefix without weight": (f"0.7 {empty} {empty}", r"^data.path: expected prefixes or pairs of weight"),
        "a prefix twice": (f"0.5 {empty} 0.5 {empty}", r"^data.path: .*empty appears more than once$"),
        "empty corpus": (empty, r"^data.path: .*empty holds no documents$"),
        "only empty documents": (build(root / "blank", [[eos], [eos]]), r"^data.path: every document is empty"),
        "cut short": (str(root / "short"), r"^data.path: .*short.bin holds 4 bytes, its index says 10 "),
        "not an index": (str(root / "garbage"), r"^data.path: .*garbage.idx is not an index of megatron-core's"),
    }


def test_bad_indexed_settings_name_the_setting_in_one_line(tmp_path, tokenizer):
    for case, (path, message) in bad_corpora(tmp_path, tokenizer.eos_id).items():
        with pytest.raises(ConfigError) as error:
            DataSource(indexed_cfg(path, streams=1), tokenizer, SEQ_LEN)
        assert re.search(message, str(error.value)) and "\n" not in str(error.value), (case, str(error.value))


@pytest.mark.parametrize("args, message", [
    (["data.prepare.workers=1"], "out: not set"),
    (["data=indexed", "data.path=/x", "out=OUT"], "data.source: prepare reads default, files, hub, got 'indexed'"),
    (["data=files", "data.path=/no/such.jsonl", "out=OUT"], "data.path: /no/such.jsonl does not exist"),
    (["data.prepare.workers=0", "out=OUT"], "data.prepare.workers: must be a positive integer, got '0'"),
    (["data.prepare.chunks=2", "out=OUT"], "data.prepare.chunks: unknown setting"),
    (["data.bogus=1", "out=OUT"], "config: unknown key 'data.bogus'"),
])
def test_prepare_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    assert prepare([arg.replace("OUT", str(tmp_path / "out")) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_the_trainer_reads_an_indexed_corpus(prepared, jsonl, tokenizer, tmp_path):
    from trainer.config import compose_config
    from trainer.distributed import DistEnv
    from trainer.train import plan_run

    cfg = compose_config(["data=indexed", f"data.path={prepared}", "data.streams=4", "data.seed=2",
                          f"trainer.run_dir={tmp_path}"])
    got = RankStreams(plan_run(cfg, DistEnv()).stream).read(8)
    want = RankStreams(DataSource(files_cfg(jsonl, streams=4, seed=2), tokenizer, cfg.stage.seq_len)).read(8)
    assert_same_windows(want, got)
