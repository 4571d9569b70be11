"""Sub-streams on real process groups (4 gloo ranks): under dp=4, tp=2 (dp=2), cp=2 (dp=2) and tp=2 x cp=2 (dp=1)
the DP ranks' windows together are the one-process global batch, the TP/CP ranks of a replica read the same
windows, every rank tokenizes only its replica's sub-streams, and every rank gathers the same position, the one
a single process has after those steps. Then the trainer: a dp=4 run's losses and label counts equal one
process's, its checkpoint resumes under tp=2 (dp=2) with the uninterrupted run's next steps, and a data error
of one DP rank's sub-stream stops every rank with the bad-input exit code (none waits for it)."""

import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from test_data_streams import CountingTokenizer, corpus  # noqa: F401 -- the corpus fixture

from data import DataSource, RankStreams, StepPrefetcher, build_tokenizer
from trainer.train import EXIT_BAD_INPUT, main_from_overrides

SEQ_LEN = 16
STEPS = [8, 8, 16, 24, 8]  # global windows per step: the batch size changes
LAYOUTS = [{}, {"tp": 2}, {"cp": 2}, {"tp": 2, "cp": 2}]

MICRO = [
    "model.num_layers=2", "model.softmax_period=2", "model.hidden_size=32", "model.num_heads=2",
    "model.head_dim=16", "model.num_kv_heads=2", "model.num_experts=4", "model.ffn_hidden_size=64",
    "stage.seq_len=64", "trainer.micro_batch_size=1", "trainer.steps=4", "trainer.log_every=1000",
    "logging.wandb.mode=disabled", "logging.plots=false", "logging.progress_bar=false", "schedule.lr.warmup_steps=2",
    "schedule.lr.decay_steps=0", "schedule.lr.drop_at_step=null", "data.streams=8",
    # 4 windows of 64 tokens per step, 8 from the third step on
    "schedule.batch=[{tokens:0,global_batch_tokens:256},{tokens:512,global_batch_tokens:512}]",
]


def _read_under_layouts(cfg):
    from parallel import Topology

    tokenizer = build_tokenizer("default")
    results = []
    for sizes in LAYOUTS:
        topo = Topology.build(**sizes)
        counting = CountingTokenizer(tokenizer)
        prefetcher = StepPrefetcher(RankStreams(DataSource(cfg, counting, SEQ_LEN), topo.dp, topo.dp_rank,
                                                topo.dp_group))
        prefetcher.start(iter(STEPS))
        steps = [[w["input_ids"] for w in prefetcher.next_step()] for _ in STEPS]
        results.append({"dp": topo.dp, "dp_rank": topo.dp_rank, "steps": steps, "state": prefetcher.state_dict(),
                        "documents": counting.documents})
        prefetcher.stop()
    return results


def _read_then_train(rank, world_size, cfg, jobs):
    """One launch of 4 processes for both parts (starting them is the slow part on a small CPU)."""
    torch.set_num_threads(1)
    return _read_under_layouts(cfg), [main_from_overrides(overrides) for overrides in jobs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):  # noqa: F811
    root = tmp_path_factory.mktemp("dp_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main_from_overrides([*MICRO, f"trainer.run_dir={root / 'single'}"]) == 0
        step_2 = root / "dp4" / "checkpoints" / "step_000002"
        # sub-stream 3 of 4 (read by DP rank 3 alone) holds only documents the length filter rejects
        texts = [f"doc{i} " + ("word " * (2 if i % 4 == 3 else 80)) for i in range(24)]
        (root / "uneven.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        uneven = ["data.source=files", f"data.path={root / 'uneven.jsonl'}", "data.streams=4", "data.min_doc_tokens=20"]
        per_rank = run_distributed(_read_then_train, 4, corpus, [
            [*MICRO, "parallel=dp", f"trainer.run_dir={root / 'dp4'}", "trainer.checkpoint.every=2",
             "trainer.checkpoint.keep_last=0"],
            [*MICRO, "parallel=tp2", f"trainer.run_dir={root / 'dp4_to_tp2'}", f"trainer.resume={step_2}"],
            [*MICRO, "parallel=dp", f"trainer.run_dir={root / 'uneven'}", *uneven],
        ])
    finally:
        torch.set_num_threads(threads)
    assert all(rcs == [0, 0, EXIT_BAD_INPUT] for _, rcs in per_rank), per_rank  # no rank waits for rank 3
    return root, [reads for reads, _ in per_rank]


def test_union_over_dp_ranks_under_every_layout(runs, corpus):  # noqa: F811
    reference = RankStreams(DataSource(corpus, build_tokenizer("default"), SEQ_LEN))
    single = [[w["input_ids"] for w in reference.read(count)] for count in STEPS]
    per_rank = runs[1]
    for i, sizes in enumerate(LAYOUTS):
        runs = [results[i] for results in per_rank]
        dp = runs[0]["dp"]
        assert dp == 4 // (sizes.get("tp", 1) * sizes.get("cp", 1))
        replicas = {}
        for run in runs:  # the TP/CP ranks of a replica read the same windows
            first = replicas.setdefault(run["dp_rank"], run)
            assert all(torch.equal(a, b) for s, t in zip(first["steps"], run["steps"]) for a, b in zip(s, t))
            assert all(d % corpus["streams"] % dp == run["dp_rank"] for d in run["documents"]), (sizes, run["dp_rank"])
        assert sorted(replicas) == list(range(dp))
        for k, want in enumerate(single):
            got = [replicas[g % dp]["steps"][k][g // dp] for g in range(len(want))]
            assert all(torch.equal(a, b) for a, b in zip(want, got)), (sizes, k)
        assert all(run["state"] == reference.state_dict() for run in runs), sizes


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(reference: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in reference[-len(got):]]
    for a, b in zip(reference[-len(got):], got):
        assert b["label_tokens"] == a["label_tokens"] and b["global_batch_tokens"] == a["global_batch_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]


def test_data_parallel_run_counts_and_trains_like_one_process(runs):
    single = metrics(runs[0] / "single")
    assert [r["micro_batches"] for r in single] == [4, 4, 8, 8]
    assert_same_steps(single, metrics(runs[0] / "dp4"))


def test_checkpoint_of_dp4_resumes_under_dp2(runs):
    got = metrics(runs[0] / "dp4_to_tp2")
    assert [r["step"] for r in got] == [3, 4]
    assert_same_steps(metrics(runs[0] / "single"), got)
