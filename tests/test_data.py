"""Data pipeline: shipped tokenizer, corpora via datasets, packing invariants, exact resumption."""

import itertools
import json

import pytest
import torch

from data import ConfigError, WindowStream, build_tokenizer, collate_windows, load_corpus

SEQ_LEN = 32
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def make_texts(count=12, long_every=5):
    """Short documents plus every `long_every`-th one several windows long."""
    texts = []
    for i in range(count):
        n_words = 60 + 7 * i if i % long_every == 0 else 1 + (5 * i) % 13
        texts.append(f"doc{i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n_words)))
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


@pytest.fixture(scope="module")
def texts():
    return make_texts()


@pytest.fixture
def jsonl_cfg(tmp_path, texts):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return {"source": "files", "path": str(path), "text_field": "text", "shuffle": False}


def take(stream, count):
    return [stream.next_window() for _ in range(count)]


def reference_stream(tokenizer, texts, epochs):
    tokens = []
    for _ in range(epochs):
        for text in texts:
            tokens += tokenizer.encode(text) + [tokenizer.eos_id]
    return tokens


def check_window(window, next_first_token, eos_id, seq_len=SEQ_LEN):
    ids, labels, cu = window["input_ids"], window["labels"], window["cu_seqlens"]
    assert ids.shape == labels.shape == (seq_len,) and ids.dtype == labels.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == seq_len and bool((cu[1:] > cu[:-1]).all())
    following = torch.cat([ids[1:], torch.tensor([next_first_token])])
    at_eos = ids == eos_id  # the test corpus never spells out the EOS token, so EOS = document end
    assert torch.equal(labels[~at_eos], following[~at_eos])  # next token within a document
    assert bool((labels[at_eos] == -100).all())  # no target across a document boundary
    starts = [0] + [t + 1 for t in range(seq_len - 1) if ids[t] == eos_id]
    assert cu.tolist() == starts + [seq_len]


def test_shipped_tokenizer_round_trips(tokenizer):
    assert tokenizer.vocab_size == 4096
    raw = tokenizer._backend
    assert tokenizer.eos_id == raw.token_to_id("<|endoftext|>") and raw.token_to_id("<|pad|>") is not None
    for text in ["def f(x):\n    return x  # comment\n", "naïve café 日本語 \t tabs  and  spaces", ""]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids) and tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(["hello world", "x"]) == [tokenizer.encode("hello world"), tokenizer.encode("x")]
    assert len(tokenizer.encode("The quick brown fox returns the value.")) < 20  # it learned merges


def test_tokenizer_from_local_json_and_folder(tmp_path, tokenizer):
    from data.tokenizer import DEFAULT_TOKENIZER

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(DEFAULT_TOKENIZER.read_text())
    for spec in [str(folder / "tokenizer.json"), str(folder)]:
        local = build_tokenizer(spec)
        assert local.eos_id == tokenizer.eos_id and local.encode("abc def") == tokenizer.encode("abc def")


def test_windows_pack_the_document_stream(tokenizer, texts, jsonl_cfg):
    stream = WindowStream(jsonl_cfg, tokenizer, SEQ_LEN, seed=0)
    windows = take(stream, 41)
    expected = reference_stream(tokenizer, texts, epochs=4)
    flat = torch.cat([w["input_ids"] for w in windows]).tolist()
    assert len(flat) < len(expected) - 1 and flat == expected[: len(flat)]  # windows wrap a few epochs
    for k, window in enumerate(windows):
        check_window(window, expected[(k + 1) * SEQ_LEN], tokenizer.eos_id)


def test_long_documents_span_windows(tokenizer):
    from datasets import Dataset

    long_text = " ".join(WORDS[j % 12] + str(j) for j in range(200))
    n_tokens = len(tokenizer.encode(long_text))
    assert n_tokens > 4 * SEQ_LEN
    stream = WindowStream(Dataset.from_dict({"text": [long_text]}), tokenizer, SEQ_LEN)
    windows = take(stream, n_tokens // SEQ_LEN)
    for window in windows[:-1]:  # whole windows inside the document: one segment, every label real
        assert window["cu_seqlens"].tolist() == [0, SEQ_LEN] and bool((window["labels"] != -100).all())
    assert torch.cat([w["input_ids"] for w in windows]).tolist() == tokenizer.encode(long_text)[: len(windows) * SEQ_LEN]


def test_shuffled_epochs_hold_every_document_once(tokenizer, texts):
    from datasets import Dataset

    stream = WindowStream(Dataset.from_dict({"text": texts}), tokenizer, SEQ_LEN, seed=3)
    total = len(reference_stream(tokenizer, texts, epochs=1))
    flat = torch.cat([w["input_ids"] for w in take(stream, 2 * total // SEQ_LEN + 1)]).tolist()
    docs, current = [], []
    for token in flat:
        current.append(token)
        if token == tokenizer.eos_id:
            docs.append(tokenizer.decode(current[:-1]))
            current = []
    first, second = docs[: len(texts)], docs[len(texts): 2 * len(texts)]
    assert sorted(first) == sorted(texts) and sorted(second) == sorted(texts)
    assert first != texts and first != second  # shuffled, and differently in each epoch


def test_same_seed_same_windows_other_seed_differs(tokenizer, texts):
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": texts})
    a, b, c = (take(WindowStream(dataset, tokenizer, SEQ_LEN, seed=s), 6) for s in (5, 5, 6))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


@pytest.mark.parametrize("skip", [0, 3, 17])  # 17 windows crosses an epoch boundary
def test_resume_gives_exactly_the_next_windows(tokenizer, texts, skip):
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": texts})
    stream = WindowStream(dataset, tokenizer, SEQ_LEN, seed=1)
    take(stream, skip)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = take(stream, 8)
    resumed = WindowStream(dataset, tokenizer, SEQ_LEN, seed=1)
    resumed.load_state_dict(state)
    for x, y in zip(expected, take(resumed, 8)):
        assert all(torch.equal(x[key], y[key]) for key in x)


def test_resume_with_another_seed_is_refused(tokenizer, texts):
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": texts})
    state = WindowStream(dataset, tokenizer, SEQ_LEN, seed=1).state_dict()
    with pytest.raises(ValueError, match="data.seed"):
        WindowStream(dataset, tokenizer, SEQ_LEN, seed=2).load_state_dict(state)


def test_streaming_files_read_in_order_and_resume(tokenizer, texts, jsonl_cfg):
    cfg = {**jsonl_cfg, "streaming": True}
    stream = WindowStream(cfg, tokenizer, SEQ_LEN)
    first = take(stream, 9)
    expected = reference_stream(tokenizer, texts, epochs=2)
    assert torch.cat([w["input_ids"] for w in first]).tolist() == expected[: 9 * SEQ_LEN]
    state = stream.state_dict()
    resumed = WindowStream(cfg, tokenizer, SEQ_LEN)
    resumed.load_state_dict(state)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(take(stream, 4), take(resumed, 4)))


def test_text_and_parquet_files_folders_and_globs(tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    for i, text in enumerate(texts[:3]):
        (tmp_path / "txt" / f"{i}.txt").write_text(text + "\nsecond line\n")
    per_file = load_corpus({"source": "files", "path": str(tmp_path / "txt")})
    assert len(per_file) == 3 and per_file[0]["text"].startswith(texts[0])
    per_line = load_corpus({"source": "files", "path": str(tmp_path / "txt" / "*.txt"), "sample_by": "line"})
    assert len(per_line) == 6 and per_line[1]["text"] == "second line"
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "c.parquet")
    table = load_corpus({"source": "files", "path": str(tmp_path / "c.parquet"), "text_field": "body"})
    assert table.column_names == ["body"] and table["body"] == texts


def test_collate_flattens_windows(tokenizer, texts):
    from datasets import Dataset

    windows = take(WindowStream(Dataset.from_dict({"text": texts}), tokenizer, SEQ_LEN), 3)
    batch = collate_windows(windows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3 * SEQ_LEN,)
    assert batch["num_tokens"] == int((batch["labels"] != -100).sum())
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[-1] == 3 * SEQ_LEN
    assert {0, SEQ_LEN, 2 * SEQ_LEN} <= set(cu.tolist())  # window edges are segment edges
    assert len(cu) == sum(len(w["cu_seqlens"]) - 1 for w in windows) + 1
    assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())


def test_document_length_filter(tokenizer, jsonl_cfg):
    stream = WindowStream({**jsonl_cfg, "min_doc_tokens": 20, "max_doc_tokens": 200}, tokenizer, SEQ_LEN)
    flat = torch.cat([w["input_ids"] for w in take(stream, 20)])
    ends = (flat == tokenizer.eos_id).nonzero().flatten().tolist()
    lengths = [b - a for a, b in itertools.pairwise(ends)]  # tokens of each whole document, EOS included
    assert lengths and all(21 <= n <= 200 for n in lengths)
    with pytest.raises(ConfigError, match=r"^data.min_doc_tokens/max_doc_tokens: no document"):
        WindowStream({**jsonl_cfg, "min_doc_tokens": 10**9}, tokenizer, SEQ_LEN).next_window()


@pytest.mark.parametrize("cfg, message", [
    ({"source": "files", "path": "/no/such/corpus.jsonl"}, r"^data.path: /no/such/corpus.jsonl does not exist$"),
    ({"source": "files", "path": None}, r"^data.path: not set"),
    ({"source": "files", "path": "/no/such/*.jsonl"}, r"^data.path: no file matches /no/such/\*.jsonl$"),
    ({"source": "nowhere"}, r"^data.source: must be one of default, files, hub, got 'nowhere'$"),
    ({"source": "default", "text_field": "body"}, r"^data.text_field: no column 'body'"),
])
def test_bad_corpus_settings(cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_corpus(cfg)


def test_empty_folder_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path: .* holds no .*files$"):
        load_corpus({"source": "files", "path": str(tmp_path)})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^data.path: "):
        load_corpus({"source": "files", "path": str(tmp_path / "empty.jsonl")})


def test_bad_tokenizers(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.tokenizer: /no/such/tokenizer.json does not exist$"):
        build_tokenizer("/no/such/tokenizer.json")
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^data.tokenizer: cannot load '.*tokenizer.json': "):
        build_tokenizer(str(broken))
    with pytest.raises(ConfigError) as info:
        build_tokenizer(str(broken))
    assert "\n" not in str(info.value)
