"""Long-context mixtures: weighted, deterministic, resumable choice of source streams."""

import json

import pytest
import torch

from data import ConfigError, MixtureStream, WindowStream, build_stream, build_tokenizer, interpolate_weights

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


def source(tokenizer, word, count=6):
    """A stream whose documents are all made of `word`, so each window shows its source."""
    from datasets import Dataset

    texts = [" ".join([f"{word}{i}"] * (3 + 4 * i)) for i in range(count)]
    return WindowStream(Dataset.from_dict({"text": texts}), tokenizer, SEQ_LEN, seed=0)


def mixture(tokenizer, weights, seed=0):
    return MixtureStream({name: source(tokenizer, name) for name in ("short", "medium", "long")}, weights, seed)


def test_weights_are_respected(tokenizer):
    stream = mixture(tokenizer, {"short": 0.2, "medium": 0.3, "long": 0.5})
    for _ in range(1000):
        stream.next_window()
    assert abs(stream.counts["short"] - 200) < 50
    assert abs(stream.counts["medium"] - 300) < 50
    assert abs(stream.counts["long"] - 500) < 50


def test_set_weights_moves_linearly_and_zero_means_never(tokenizer):
    stage_128k, stage_512k = {"short": 0.3, "medium": 0.7}, {"short": 0.35, "medium": 0.35, "long": 0.3}
    halfway = interpolate_weights(stage_128k, stage_512k, 0.5)
    assert halfway == pytest.approx({"short": 0.325, "medium": 0.525, "long": 0.15})
    assert interpolate_weights(stage_128k, stage_512k, 2.0) == pytest.approx(stage_512k)
    stream = mixture(tokenizer, stage_128k)
    sources = set()
    for _ in range(100):
        stream.next_window()
        sources.add(stream.last_source)
    assert sources == {"short", "medium"}
    stream.set_weights({"long": 1.0})
    stream.next_window()
    assert stream.last_source == "long"


def test_windows_come_whole_from_their_source(tokenizer):
    stream = mixture(tokenizer, {"short": 1, "medium": 1, "long": 1})
    for _ in range(20):
        text = tokenizer.decode(stream.next_window()["input_ids"])
        others = {"short", "medium", "long"} - {stream.last_source}
        assert not any(name in text for name in others)


def test_mixture_resumes_exactly(tokenizer):
    weights = {"short": 0.3, "medium": 0.3, "long": 0.4}
    stream = mixture(tokenizer, weights, seed=7)
    for _ in range(13):
        stream.next_window()
    stream.set_weights({"short": 0.1, "medium": 0.1, "long": 0.8})
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [(stream.next_window(), stream.last_source) for _ in range(10)]
    resumed = mixture(tokenizer, weights, seed=7)
    resumed.load_state_dict(state)
    got = [(resumed.next_window(), resumed.last_source) for _ in range(10)]
    assert [name for _, name in got] == [name for _, name in expected]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for (a, _), (b, _) in zip(expected, got))


def test_bad_weights(tokenizer):
    with pytest.raises(ConfigError, match=r"^data.mixture: unknown source\(s\) huge"):
        mixture(tokenizer, {"huge": 1.0})
    with pytest.raises(ConfigError, match=r"^data.mixture: weights must be"):
        mixture(tokenizer, {"short": 0.0})


def test_build_stream_from_config(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (2, 3, 50, 60, 200)))
    cfg = {
        "source": "files", "path": str(path), "seed": 1,
        "mixture": {
            "short": {"max_doc_tokens": 32, "weight": 0.5},
            "long": {"min_doc_tokens": 32, "weight": 0.5},
        },
    }
    stream = build_stream(cfg, tokenizer, SEQ_LEN)
    assert isinstance(stream, MixtureStream) and stream.streams["short"].max_doc_tokens == 32
    for _ in range(6):
        stream.next_window()
    plain = build_stream({k: v for k, v in cfg.items() if k != "mixture"}, tokenizer, SEQ_LEN)
    assert isinstance(plain, WindowStream) and plain.seed == 1
