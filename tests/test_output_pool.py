"""The output buffer pool (csrc/buffer_pool.h, lwkernels/cpu/outputs.py): the eager CPU fast paths
return ordinary tensors whose memory is reused across calls instead of being mapped afresh, never
shared between live tensors, and given back when PyTorch frees them."""
import gc
import pickle
import threading

import pytest
import torch

import lwkernels
from lwkernels import JointBlock
from lwkernels.cpu.backend import native
from lwkernels.cpu.outputs import OUTPUT_CACHE_ENV, apply_cache_limit_from_env, new_output, output_cache_stats
from helpers import randomize_


@pytest.fixture
def _C():
    return native()


@pytest.fixture
def limit(_C):
    """Restores the pool's limit after a test that changes it."""
    before = output_cache_stats()["limit_bytes"]
    yield
    _C.set_output_pool_limit(before)


def _block():
    return randomize_(JointBlock(8, 16, dilation=2), 0).eval()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_new_output_is_a_dense_tensor_of_the_asked_layout(_C, memory_format, dtype):
    y = new_output(_C, (2, 5, 7, 3), dtype, memory_format)
    assert y.shape == (2, 5, 7, 3) and y.dtype == dtype and y.is_cpu
    assert y.is_contiguous(memory_format=memory_format)
    y.fill_(1.5)
    assert float(y.sum()) == 1.5 * y.numel()
    assert y.data_ptr() % 64 == 0


def test_block_outputs_reuse_freed_buffers_but_never_live_ones(_C):
    block, x = _block(), torch.randn(1, 8, 40, 40)
    with torch.no_grad():
        block(x)
        live = [block(x) for _ in range(3)]  # three live outputs: three buffers
        assert len({y.data_ptr() for y in live}) == 3
        expected = [y.clone() for y in live]
        hits = output_cache_stats()["hits"]
        del live[0]
        again = block(x)  # reuses the freed one
        assert output_cache_stats()["hits"] == hits + 1
        for y, e in zip(live[1:], expected[1:]):
            assert torch.equal(y, e)  # untouched by the new call
        assert torch.equal(again, expected[0])


def test_limit_zero_keeps_nothing_and_clear_cache_trims(_C, limit):
    block, x = _block(), torch.randn(1, 8, 32, 32)
    with torch.no_grad():
        block(x)
        block(x)
    assert output_cache_stats()["cached_bytes"] > 0
    lwkernels.clear_cache()
    assert output_cache_stats()["cached_bytes"] == 0
    _C.set_output_pool_limit(0)
    with torch.no_grad():
        for _ in range(3):
            block(x)
    assert output_cache_stats()["cached_bytes"] == 0


def test_env_limit_is_read_and_checked(_C, limit, monkeypatch):
    monkeypatch.setenv(OUTPUT_CACHE_ENV, "3")
    apply_cache_limit_from_env(_C)
    assert output_cache_stats()["limit_bytes"] == 3 << 20
    for bad in ("-1", "lots"):
        monkeypatch.setenv(OUTPUT_CACHE_ENV, bad)
        with pytest.raises(ValueError, match=OUTPUT_CACHE_ENV):
            apply_cache_limit_from_env(_C)


def test_pooled_outputs_behave_like_any_tensor():
    block, x = _block(), torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        block(x)
        y = block(x)
    ref = y.clone()
    assert torch.equal(pickle.loads(pickle.dumps(y)), ref)
    assert torch.equal(torch.from_numpy(y.numpy().copy()), ref)
    y.add_(1)
    assert torch.equal(y, ref + 1)
    y.resize_(4, 8, 12, 12)  # grows into memory PyTorch allocates
    assert y.shape == (4, 8, 12, 12)
    z = ref.clone().requires_grad_()
    (z * 2).sum().backward()
    with torch.inference_mode():
        assert block(x).is_inference()


def test_outputs_freed_on_other_threads(_C):
    block, x = _block(), torch.randn(1, 8, 20, 20)
    with torch.no_grad():
        block(x)
        outputs = [block(x) for _ in range(16)]
    expected = [y.clone() for y in outputs]
    before = output_cache_stats()

    def drop(chunk):
        for i in chunk:
            outputs[i] = None
        gc.collect()

    threads = [threading.Thread(target=drop, args=(range(k, 16, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert output_cache_stats()["cached_bytes"] >= before["cached_bytes"]
    with torch.no_grad():
        assert torch.equal(block(x), expected[0])


def test_bad_requests_are_refused(_C):
    with pytest.raises(ValueError, match="rank"):
        _C.pooled_tensor([1, 2], [2], 4)
    with pytest.raises(ValueError, match="itemsize"):
        _C.pooled_tensor([1, 2], [2, 1], 2)
    with pytest.raises(ValueError, match="negative"):
        _C.pooled_tensor([1, -2], [2, 1], 4)
