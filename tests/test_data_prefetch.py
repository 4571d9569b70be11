"""The background reader: the same windows as reading in the training thread, read ahead in its own thread, a
checkpoint position that ignores the read-ahead, a clean stop, and the worker's exceptions raised in training."""

import threading
import time

import pytest
import torch

from data import ConfigError, DataSource, RankStreams, StepPrefetcher, build_tokenizer

SEQ_LEN = 16
STEPS = [4, 4, 8, 8, 8, 4]


class ThreadRecordingTokenizer:
    def __init__(self, tokenizer, fail_after=None):
        self._tokenizer, self.eos_id, self.threads, self.fail_after = tokenizer, tokenizer.eos_id, [], fail_after

    def encode_batch(self, texts):
        self.threads.append(threading.current_thread().name)
        if self.fail_after is not None and len(self.threads) > self.fail_after:
            raise RuntimeError("tokenizer backend failed")
        return self._tokenizer.encode_batch(texts)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


CFG = {"source": "default", "seed": 2, "streams": 4}


def reader(tokenizer, cfg=CFG, dp=1, dp_rank=0):
    return RankStreams(DataSource(cfg, tokenizer, SEQ_LEN), dp, dp_rank)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
                                    for x, y in zip(a, b))


def no_reader_thread_left():
    return not any(t.name == "data-prefetch" for t in threading.enumerate())


def test_prefetched_steps_are_the_steps_read_in_place(tokenizer):
    direct = reader(tokenizer, dp=2, dp_rank=1)
    expected = [direct.read(n) for n in STEPS]
    prefetcher = StepPrefetcher(reader(tokenizer, dp=2, dp_rank=1))
    prefetcher.start(iter(STEPS))
    assert all(same(want, prefetcher.next_step()) for want in expected)
    prefetcher.stop()
    assert no_reader_thread_left()


def test_reads_ahead_in_its_own_thread_and_saves_only_what_was_handed_out(tokenizer):
    recording = ThreadRecordingTokenizer(tokenizer)
    streams = reader(recording)
    prefetcher = StepPrefetcher(streams, depth=2)
    prefetcher.start(iter(STEPS))
    first = prefetcher.next_step()
    deadline = time.monotonic() + 30
    while streams.windows < sum(STEPS[:3]) and time.monotonic() < deadline:  # 2 steps beyond the one handed out
        time.sleep(0.01)
    assert streams.windows == sum(STEPS[:3])  # and no further: `depth` steps ahead
    assert set(recording.threads) == {"data-prefetch"}  # tokenization never ran in the training thread
    state = prefetcher.state_dict()
    assert state["windows"] == STEPS[0]
    in_place = reader(tokenizer)
    in_place.read(STEPS[0])
    assert state == in_place.state_dict()
    prefetcher.stop()
    assert no_reader_thread_left()
    resumed = reader(tokenizer)
    resumed.load_state_dict(state)
    second = reader(tokenizer)
    assert same(second.read(STEPS[0]), first)
    assert same(resumed.read(STEPS[1]), second.read(STEPS[1]))


def test_stop_and_start_again_continue_after_the_last_step_handed_out(tokenizer):
    expected = reader(tokenizer).read(sum(STEPS[:4]))
    prefetcher = StepPrefetcher(reader(tokenizer))
    prefetcher.start(iter(STEPS[:2]))
    got = prefetcher.next_step()
    prefetcher.stop()  # step 2 was read ahead and is dropped
    prefetcher.start(iter(STEPS[1:]))
    for _ in range(3):
        got += prefetcher.next_step()
    prefetcher.stop()
    assert same(expected, got) and no_reader_thread_left()


def test_stop_joins_a_thread_blocked_on_a_full_queue(tokenizer):
    prefetcher = StepPrefetcher(reader(tokenizer), depth=1)
    prefetcher.start(iter(lambda: 4, None))  # endless steps
    prefetcher.next_step()
    time.sleep(0.2)  # the thread fills the queue and waits
    started = time.monotonic()
    prefetcher.stop()
    assert time.monotonic() - started < 5 and no_reader_thread_left()


def test_a_data_error_in_the_thread_is_raised_in_training(tokenizer):
    prefetcher = StepPrefetcher(reader(tokenizer, {**CFG, "min_doc_tokens": 10**9}))
    prefetcher.start(iter(STEPS))
    with pytest.raises(ConfigError, match=r"^data.min_doc_tokens/max_doc_tokens: no document in sub-stream 0 of "
                                          r"data.streams=4 has a token count in \[1000000000, None\)$"):
        prefetcher.next_step()
    assert not prefetcher.running and no_reader_thread_left()


def test_any_exception_in_the_thread_is_raised_in_training(tokenizer):
    failing = ThreadRecordingTokenizer(tokenizer, fail_after=3)
    prefetcher = StepPrefetcher(reader(failing))
    prefetcher.start(iter(lambda: 8, None))
    with pytest.raises(RuntimeError, match="^tokenizer backend failed$"):
        for _ in range(100):
            prefetcher.next_step()
    assert no_reader_thread_left()


def test_trainer_reports_a_data_error_of_the_thread_in_one_line(tmp_path, capsys):
    from trainer.train import EXIT_BAD_INPUT, main_from_overrides

    micro = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.head_dim=16",
             "model.num_kv_heads=1", "model.num_experts=4", "model.ffn_hidden_size=64", "model.softmax_period=2",
             "stage.seq_len=64", "trainer.micro_batch_size=2", "trainer.steps=3", "logging.wandb.mode=disabled", "logging.plots=false",
             "logging.progress_bar=false", "schedule.lr.warmup_steps=1", "schedule.lr.decay_steps=0",
             "schedule.batch=[{tokens:0,global_batch_tokens:128}]", "data.min_doc_tokens=1000000000",
             f"trainer.run_dir={tmp_path / 'run'}"]
    capsys.readouterr()
    assert main_from_overrides(micro) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: data.min_doc_tokens/max_doc_tokens: no document in sub-stream 0 of "
                                "data.streams=64 has a token count in [1000000000, None)"), errors
    assert no_reader_thread_left()
