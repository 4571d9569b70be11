"""Run a function on N gloo ranks inside pytest: `run_distributed(fn, world_size, *args)`.

`fn(rank, world_size, *args)` runs in a spawned process with the default process group initialised (gloo on
CPU; `backend="nccl"` gives rank r the GPU r). Its return value on each rank comes back as a list; an exception on any rank fails the test with that
rank's traceback. Functions and arguments must be picklable (define `fn` at module level).
"""

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N ranks share 2 cores
    out_path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out_path)
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out_path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, backend: str = "gloo"):
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, result_dir, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(result_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}, timeout {timeout}s?)")
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}:\n{rec['error']}")
        if errors:
            raise AssertionError("distributed run failed:\n" + "\n".join(errors))
        return results
