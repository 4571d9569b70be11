"""Lightning attention references: chunked == naive recurrence, document resets, state hand-off,
gradients, low precision, input validation, and the public dispatcher on CPU."""


import pytest
import torch
from conftest import cu_from_lengths

from kernels.lightning_attention import BACKEND_ENV_VAR, lightning_attention
from kernels.lightning_reference import lightning_attention_chunked, lightning_attention_naive

F64 = torch.float64


def random_inputs(gen, T, H=2, d_k=4, d_v=3, dtype=F64, n_docs=None):
    q, k = (torch.randn(T, H, d_k, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(T, H, d_v, generator=gen, dtype=F64)
    # Slopes spanning slow to fast decay (MiniMax's range is about 2^-8 .. 0.7).
    slope = torch.rand(H, generator=gen, dtype=F64) * 0.9 + 0.004
    init = None if n_docs is None else torch.randn(n_docs, H, d_k, d_v, generator=gen, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype), slope, init


def random_lengths(gen, layout, block_size):
    """Document lengths for the named layout (drawn afresh each run)."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
    if layout == "single":
        return [r(1, 3 * block_size + 5)]
    if layout == "length_one_docs":
        return [1, r(2, 9), 1, 1, r(1, 2 * block_size + 3), 1]
    if layout == "ragged":  # lengths that are not multiples of the block and cross block boundaries
        return [r(1, 2 * block_size + 7) for _ in range(r(2, 5))]
    if layout == "whole_blocks":
        return [block_size * r(1, 3) for _ in range(r(1, 3))]
    if layout == "with_empty_doc":
        return [r(1, 9), 0, r(1, 9)]
    raise ValueError(layout)


def assert_close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["single", "length_one_docs", "ragged", "whole_blocks", "with_empty_doc"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_matches_naive(gen, layout, block_size, with_initial_state):
    lengths = random_lengths(gen, layout, min(block_size, 8))
    cu = cu_from_lengths(lengths)
    q, k, v, slope, init = random_inputs(
        gen, sum(lengths), n_docs=len(lengths) if with_initial_state else None
    )

    o_ref, state_ref = lightning_attention_naive(q, k, v, slope, cu, init, output_final_state=True)
    o, state = lightning_attention_chunked(
        q, k, v, slope, cu, init, output_final_state=True, block_size=block_size
    )
    assert o.shape == q.shape[:2] + v.shape[2:] and o.dtype == F64
    assert state.shape == (len(lengths), 2, 4, 3)
    assert_close(o, o_ref)
    assert_close(state, state_ref)


def test_naive_matches_closed_form(gen):
    """The naive recurrence itself against o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s."""
    T = 7
    q, k, v, slope, _ = random_inputs(gen, T)
    o, _ = lightning_attention_naive(q, k, v, slope)
    t = torch.arange(T, dtype=F64)
    gap = t[:, None] - t[None, :]
    decay = torch.exp(-slope[:, None, None] * gap.clamp(min=0)) * (gap >= 0)  # [H, T, T]
    expected = torch.einsum("hts,thd,shd,she->the", decay, q, k, v)
    assert_close(o, expected)


def test_packed_documents_reset_state(gen):
    lengths = [5, 1, 19, 8]
    cu = cu_from_lengths(lengths)
    q, k, v, slope, init = random_inputs(gen, sum(lengths), n_docs=len(lengths))
    o, state = lightning_attention_chunked(q, k, v, slope, cu, init, output_final_state=True, block_size=4)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_alone, state_alone = lightning_attention_naive(
            q[start:end], k[start:end], v[start:end], slope, None, init[n : n + 1], output_final_state=True
        )
        assert_close(o[start:end], o_alone)
        assert_close(state[n], state_alone[0])


@pytest.mark.parametrize("block_size", [4, 64])
def test_split_into_two_calls_equals_one(gen, block_size):
    T = 41
    q, k, v, slope, _ = random_inputs(gen, T)
    split = int(torch.randint(1, T, (1,), generator=gen))
    run = lambda a, b, init: lightning_attention_chunked(
        q[a:b], k[a:b], v[a:b], slope, None, init, output_final_state=True, block_size=block_size
    )
    o_whole, state_whole = run(0, T, None)
    o_first, state_first = run(0, split, None)
    o_second, state_second = run(split, T, state_first)
    assert_close(torch.cat([o_first, o_second]), o_whole)
    assert_close(state_second, state_whole)


def test_split_inside_a_packed_document(gen):
    """Packed call cut inside its second document: only that document's state is handed over."""
    lengths = [6, 13, 9]
    cu = cu_from_lengths(lengths)
    q, k, v, slope, _ = random_inputs(gen, sum(lengths))
    o_whole, state_whole = lightning_attention_chunked(
        q, k, v, slope, cu, output_final_state=True, block_size=4
    )
    split = 6 + 7
    o_first, state_first = lightning_attention_chunked(
        q[:split], k[:split], v[:split], slope, cu_from_lengths([6, 7]), output_final_state=True, block_size=4
    )
    init_second = torch.stack([state_first[1], torch.zeros_like(state_first[1])])
    o_second, state_second = lightning_attention_chunked(
        q[split:], k[split:], v[split:], slope, cu_from_lengths([6, 9]), init_second, True, block_size=4
    )
    assert_close(torch.cat([o_first, o_second]), o_whole)
    assert_close(state_second, state_whole[1:])


def test_gradients_match_naive(gen):
    lengths = [3, 1, 10, 6]
    cu = cu_from_lengths(lengths)
    q, k, v, slope, init = random_inputs(gen, sum(lengths), n_docs=len(lengths))
    inputs = [x.requires_grad_() for x in (q, k, v, init)]
    grad_o = torch.randn(q.shape[0], 2, 3, generator=gen, dtype=F64)
    grad_state = torch.randn(init.shape, generator=gen, dtype=F64)

    def grads(fn, **kw):
        o, state = fn(q, k, v, slope, cu, init, output_final_state=True, **kw)
        loss = (o * grad_o).sum() + (state * grad_state).sum()
        return torch.autograd.grad(loss, inputs)

    for g_chunked, g_naive in zip(
        grads(lightning_attention_chunked, block_size=4), grads(lightning_attention_naive)
    ):
        assert_close(g_chunked, g_naive)


def test_gradcheck_chunked(gen):
    cu = cu_from_lengths([2, 5])
    q, k, v, slope, init = random_inputs(gen, 7, H=1, d_k=2, d_v=2, n_docs=2)
    inputs = [x.requires_grad_() for x in (q, k, v, init)]

    def fn(q, k, v, init):
        return lightning_attention_chunked(q, k, v, slope, cu, init, output_final_state=True, block_size=3)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(gen, dtype, tol):
    lengths = [37, 3, 50]
    cu = cu_from_lengths(lengths)
    q, k, v, slope, init = random_inputs(gen, sum(lengths), n_docs=3)
    o_ref, state_ref = lightning_attention_naive(q, k, v, slope, cu, init, output_final_state=True)
    o, state = lightning_attention_chunked(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        slope.float(),
        cu,
        init.float(),
        output_final_state=True,
        block_size=16,
    )
    assert o.dtype == dtype and state.dtype == torch.float32
    # Inputs were rounded to `dtype`; compare with the fp64 truth by relative norm error.
    assert (o.double() - o_ref).norm() / o_ref.norm() < tol
    assert (state.double() - state_ref).norm() / state_ref.norm() < tol


def test_long_sequence_is_fast_enough(gen):
    """Thousands of tokens in many documents must run in well under a second on CPU."""
    import time

    lengths = [1, 700, 3, 1300, 40]
    q, k, v, slope, _ = random_inputs(gen, sum(lengths), H=2, d_k=16, d_v=16, dtype=torch.float32)
    lightning_attention_chunked(q[:64], k[:64], v[:64], slope.float())  # warm-up
    start = time.perf_counter()
    o, _ = lightning_attention_chunked(
        q, k, v, slope.float(), cu_from_lengths(lengths), output_final_state=True
    )
    assert time.perf_counter() - start < 2.0
    assert torch.isfinite(o).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"q": torch.zeros(5, 2)}, "q must be"),
        ({"k": torch.zeros(6, 2, 4)}, "k must have the shape of q"),
        ({"v": torch.zeros(5, 3, 4)}, "v must be"),
        ({"slope": torch.zeros(3)}, "slope must be"),
        ({"cu_seqlens": torch.tensor([0, 3, 4])}, "cu_seqlens must start at 0 and end at T=5"),
        ({"cu_seqlens": torch.tensor([0, 4, 3, 5])}, "non-decreasing"),
        ({"cu_seqlens": torch.tensor([0.0, 5.0])}, "cu_seqlens must be an integer"),
        ({"initial_state": torch.zeros(2, 2, 4, 4)}, "initial_state must be"),
        ({"block_size": 0}, "block_size must be"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = {
        "q": torch.zeros(5, 2, 4),
        "k": torch.zeros(5, 2, 4),
        "v": torch.zeros(5, 2, 4),
        "slope": torch.ones(2),
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        lightning_attention_chunked(**args)


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    cu = cu_from_lengths([4, 9])
    q, k, v, slope, init = random_inputs(gen, 13, n_docs=2)
    expected = lightning_attention_naive(q, k, v, slope, cu, init, True)
    for backend in ("", "reference"):
        monkeypatch.setenv(BACKEND_ENV_VAR, backend)
        for got, want in zip(lightning_attention(q, k, v, slope, cu, init, True), expected):
            assert_close(got, want)
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        lightning_attention(q, k, v, slope, cu)
