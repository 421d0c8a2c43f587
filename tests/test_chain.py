"""JointChain (lwkernels/nn/chain.py, cpu/prepared_chain.py): consecutive JointBlocks replayed on the
chain's own buffers in eager CPU inference. Whatever happens to the blocks, the input or the mode,
the chain returns exactly what calling its blocks in turn returns, and behaves as an nn.Sequential
everywhere else (state_dict, training, autograd, hooks, compile, export)."""
import threading

import pytest
import torch
from torch import nn

import lwkernels
from lwkernels import JointBlock, JointChain, to_reference
from lwkernels.cpu.prepared_chain import PreparedChain
from helpers import cpu_paths_here, expected_memory_format, forced_isa, randomize_, tolerance

# (C_in, C_out, stride, dilation, mid_norm, activation) of a chain with the awkward cases: odd
# sizes, stride 2 after stride 1, a mid BatchNorm, channels that are no multiple of any vector.
SPECS = [(3, 8, 2, 3, False, "relu"), (8, 13, 1, 1, True, "relu6"), (13, 16, 2, 2, False, "hardswish"),
         (16, 16, 1, 3, True, "silu"), (16, 5, 1, 1, False, None)]
# Four blocks of 16+ input channels after an RGB one: float32 runs those channels-last inside.
WIDE_SPECS = [(3, 16, 2, 1, False, "relu"), (16, 24, 1, 2, True, "relu6"), (24, 24, 2, 1, False, "hardswish"),
              (24, 17, 1, 3, True, None), (17, 16, 1, 1, False, "silu")]


def _chain(specs=SPECS, seed=0, dtype=torch.float32):
    blocks = [JointBlock(ci, co, stride=s, dilation=d, mid_norm=m, activation=a)
              for ci, co, s, d, m, a in specs]
    return randomize_(JointChain(*blocks), seed).to(dtype).eval()


def _x(*shape, seed=1, channels_last=False, dtype=torch.float32):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _blockwise(chain, x):
    """The blocks called in turn, each through its own fused call, each given its input in the
    layout the chain runs it in on the CPU, the output in x's layout: what the chain must equal.
    A float32 chain of four or more blocks with 16+ input channels runs those channels-last
    (when their input has more than one pixel); everything else runs in x's layout."""
    fmt = expected_memory_format(x)
    wide = x.dtype == torch.float32 and sum(b.depthwise.in_channels >= 16 for b in chain) >= 4
    y = x
    for block in chain:
        cl = wide and y.shape[1] >= 16 and y.shape[2] * y.shape[3] > 1
        y = block(y.contiguous(memory_format=torch.channels_last if cl else fmt))
    return y.contiguous(memory_format=fmt)


@pytest.fixture
def replays(monkeypatch):
    """Counts PreparedChain.run calls that produced the output (a replay, not the block-by-block path)."""
    count = {"n": 0}
    run = PreparedChain.run

    def counting(self, x):
        y = run(self, x)
        count["n"] += y is not None
        return y

    monkeypatch.setattr(PreparedChain, "run", counting)
    return count


@pytest.mark.parametrize("isa", cpu_paths_here())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (3, 3, 9, 8)])
@pytest.mark.parametrize("specs", [SPECS, WIDE_SPECS], ids=["narrow", "wide"])
def test_replay_equals_blocks_called_in_turn(replays, isa, dtype, channels_last, shape, specs):
    chain = _chain(specs, dtype=dtype)
    x = _x(*shape, channels_last=channels_last, dtype=dtype)
    with forced_isa(isa), torch.no_grad():
        first = chain(x)
        expected = _blockwise(chain, x)
        again = chain(x)
        ref = to_reference(chain).double()(x.double())
    assert replays["n"] == 1
    for y in (first, again):
        assert torch.equal(y, expected)
        assert y.dtype == dtype and y.is_contiguous(memory_format=expected_memory_format(x))
    rtol, atol = tolerance(dtype, 9 + 16)
    torch.testing.assert_close(again.double(), ref, rtol=rtol, atol=atol)


def test_outputs_are_fresh_tensors():
    chain, x = _chain(), _x(2, 3, 16, 16)
    with torch.no_grad():
        chain(x)
        a = chain(x)
        kept = a.clone()
        b = chain(_x(2, 3, 16, 16, seed=5))
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, kept)


def test_sees_parameter_buffer_and_mode_changes(replays):
    chain, x = _chain(), _x(2, 3, 15, 15)
    with torch.no_grad():
        chain(x)
        chain(x)
        assert replays["n"] == 1
        chain[2].pointwise.weight.mul_(1.5)  # in place: version counter
        assert torch.equal(chain(x), _blockwise(chain, x))
        chain[1].mid_bn.running_var.add_(0.25)
        assert torch.equal(chain(x), _blockwise(chain, x))
        chain[3].bn.eps = 1e-2  # a setting
        assert torch.equal(chain(x), _blockwise(chain, x))
        chain[4].pointwise.weight = nn.Parameter(torch.randn_like(chain[4].pointwise.weight))  # reassigned
        assert torch.equal(chain(x), _blockwise(chain, x))
        chain[0] = randomize_(JointBlock(3, 8, stride=2, dilation=3), seed=7).eval()  # a new block
        assert torch.equal(chain(x), _blockwise(chain, x))
        chain.train()  # batch statistics, even without grad: the training op, not the folded one
        expected = to_reference(chain).train()(x)
        torch.testing.assert_close(chain(x), expected, rtol=1e-4, atol=1e-5)


def test_input_signature_changes():
    chain = _chain()
    with torch.no_grad():
        for shape, cl in [((1, 3, 16, 16), False), ((2, 3, 16, 16), False), ((2, 3, 16, 16), True),
                          ((2, 3, 11, 16), False)]:
            x = _x(*shape, channels_last=cl)
            chain(x)
            assert torch.equal(chain(x), _blockwise(chain, x))
        x64 = _x(1, 3, 16, 16).double()
        assert torch.equal(chain.double()(x64), _blockwise(chain, x64))


def test_autograd_and_training_go_block_by_block(replays):
    chain, x = _chain(), _x(2, 3, 12, 12)
    y = chain(x)  # grad enabled, parameters require grad: the op's autograd
    y.sum().backward()
    assert all(p.grad is not None for p in chain.parameters() if p.requires_grad)
    chain.train()
    chain(x).sum().backward()
    assert replays["n"] == 0


def test_forward_hooks_still_fire(replays):
    chain, x = _chain(), _x(1, 3, 12, 12)
    seen = []
    with torch.no_grad():
        chain(x)
        chain(x)
        handle = chain[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        y = chain(x)
        handle.remove()
    assert len(seen) == 1 and torch.equal(y, _blockwise(chain, x)) and replays["n"] == 1


def test_state_dict_is_sequentials_and_to_reference_is_plain():
    chain = _chain()
    seq = nn.Sequential(*[b.to_reference() for b in chain])
    assert list(chain.state_dict()) == list(seq.state_dict())
    seq.load_state_dict(chain.state_dict())
    ref = to_reference(chain)
    assert type(ref) is nn.Sequential and not any(isinstance(m, (JointBlock, JointChain)) for m in ref.modules())
    x = _x(2, 3, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), chain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seq.eval()(x), chain(x), rtol=1e-5, atol=1e-5)


def test_other_modules_make_it_a_plain_sequential(replays):
    chain = _chain()
    chain.append(nn.ReLU())
    x = _x(1, 3, 12, 12)
    with torch.no_grad():
        chain(x)
        y = chain(x)
        plain = x  # each block as given, no layout changes
        for block in chain[:-1]:
            plain = block(plain)
    assert replays["n"] == 0 and torch.equal(y, torch.relu(plain))


def test_clear_cache_drops_the_plan(replays):
    chain, x = _chain(), _x(1, 3, 12, 12)
    with torch.no_grad():
        chain(x)
        lwkernels.clear_cache()
        chain(x)  # prepares again
        y = chain(x)
    assert replays["n"] == 1 and torch.equal(y, _blockwise(chain, x))


def test_concurrent_callers_get_their_own_results():
    chain = _chain()
    inputs = [_x(2, 3, 20, 20, seed=s) for s in range(4)]
    with torch.no_grad():
        chain(inputs[0])
        expected = [_blockwise(chain, x) for x in inputs]
    failures = []

    def work(i):
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(chain(inputs[i]), expected[i]):
                    failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_compile_and_export_see_the_blocks():
    chain, x = _chain(), _x(1, 3, 12, 12)
    with torch.no_grad():
        expected = chain(x)
        chain(x)
        exported = torch.export.export(chain, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-6)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("lwkernels.joint_block" in op for op in ops)


def test_bad_input_names_the_problem():
    chain = _chain()
    with pytest.raises((ValueError, RuntimeError), match="channel"):
        with torch.no_grad():
            chain(_x(1, 4, 12, 12))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("specs", [SPECS, WIDE_SPECS], ids=["narrow", "wide"])
def test_which_blocks_run_channels_last_inside(channels_last, dtype, specs):
    """The layouts the blocks are given in eager CPU inference: in a float32 chain of four or more
    blocks with 16+ input channels, those blocks channels-last; otherwise the caller's layout;
    the output always in the caller's layout."""
    chain = _chain(specs, dtype=dtype)
    seen = []
    for block in chain:
        block.register_forward_pre_hook(lambda m, args: seen.append(
            (args[0].shape[1], args[0].is_contiguous(memory_format=torch.channels_last)
             and not args[0].is_contiguous())))
    x = _x(2, 3, 19, 19, channels_last=channels_last, dtype=dtype)
    with torch.no_grad():
        y = chain(x)
    wide = specs is WIDE_SPECS and dtype == torch.float32
    assert [c for c, _ in seen] == [spec[0] for spec in specs]
    assert seen == [(c, (wide and c >= 16) or channels_last) for c, _ in seen]
    assert y.is_contiguous(memory_format=expected_memory_format(x))
