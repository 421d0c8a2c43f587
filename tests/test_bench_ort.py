"""ONNX Runtime as a benchmark provider: its outputs match the reference, and the plumbing (the
harness provider, the rounds timer, the bench command's column and JSON) works. Skipped where
onnxruntime is not installed (it is an optional extra); the rounds timer is tested either way."""
import json

import pytest
import torch

from lwkernels.bench.harness import make_block, make_input, make_provider, medians, thread_pool, time_in_rounds
from lwkernels.bench.onnxrt import onnxruntime_available
from lwkernels.models.shapes import BlockShape
from lwkernels.nn.fuse import to_reference

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime and onnx are not installed")

SHAPE = BlockShape(8, 16, 2, 12)


def _load_benchmark_script(name):
    """benchmarks/<name>.py as a module (the scripts are not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



@needs_ort
@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_the_reference(batch):
    block = make_block(SHAPE)
    x = make_input(SHAPE, batch)
    reference = to_reference(block)
    y = make_provider("onnxruntime", block, x, reference)()
    with torch.inference_mode():
        expected = reference.double()(x.double())
    assert y.dtype == torch.float32 and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@needs_ort
def test_onnxruntime_session_uses_torch_threads_and_default_optimisations():
    import onnxruntime as ort

    from lwkernels.bench.onnxrt import export_onnx, make_session

    block = make_block(SHAPE)
    x = make_input(SHAPE, 1)
    session = make_session(export_onnx(to_reference(block), x), threads=2)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session.get_providers() == ["CPUExecutionProvider"]


@needs_ort
def test_onnxruntime_provider_rejects_what_it_cannot_run():
    block = make_block(SHAPE)
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        make_provider("onnxruntime", block.double(), make_input(SHAPE, 1).double())


@needs_ort
def test_model_bench_with_onnxruntime_reports_its_error_and_ratio():
    from lwkernels.bench.models import format_rows, run_model_bench

    rows = run_model_bench("lightweightnet", batch=1, input_size=32, width_mult=0.25, repeats=2, warmup=1,
                           threads=1, onnxruntime=True, rounds=2, pause=0.0)
    by_provider = {r["provider"]: r for r in rows}
    assert list(by_provider) == ["reference", "onnxruntime", "lwkernels"]
    assert by_provider["onnxruntime"]["max_rel_error"] < 1e-4
    ort_ms = by_provider["onnxruntime"]["median_ms"]
    for r in rows:
        assert r["vs_onnxruntime"] == pytest.approx(ort_ms / r["median_ms"])
    assert "vs ORT" in format_rows(rows)


@needs_ort
def test_bench_command_has_an_onnxruntime_column(tmp_path, capsys):
    from lwkernels.cli.main import main

    path = tmp_path / "bench.json"
    code = main(["bench", "--shapes", "lightweightnet32", "--no-compile", "--min-time", "0.01", "--threads", "1",
                 "--rounds", "1", "--pause", "0", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "onnxruntime ms" in out and "lwkernels / ONNX Runtime speed" in out
    report = json.loads(path.read_text())
    assert report["environment"]["onnxruntime"] and report["timing"]["method"] == "rounds"
    for row in report["rows"] + report["chains"]:
        assert row["speedup_vs_onnxruntime"] == pytest.approx(row["ms"]["onnxruntime"] / row["ms"]["lwkernels"])


def test_rounds_alternate_providers_with_pauses_between_thread_pools(monkeypatch):
    """Every provider gets every round; the order rotates; pauses fall only where the pool changes."""
    import lwkernels.bench.harness as harness

    log = []
    monkeypatch.setattr(harness.time, "sleep", lambda s: log.append(("pause", s)))
    fns = {name: (lambda name=name: log.append(name)) for name in ("eager", "onnxruntime", "lwkernels")}
    pools = {"eager": "openmp", "onnxruntime": "onnxruntime", "lwkernels": "openmp"}
    times = time_in_rounds(fns, min_time=0.0, rounds=3, pause=0.25, warmup=1, min_calls=2, pools=pools)
    assert {name: len(t) for name, t in times.items()} == {"eager": 6, "onnxruntime": 6, "lwkernels": 6}
    turns = []  # (provider, calls) per turn, and the pauses in between
    for entry in log:
        if isinstance(entry, tuple):
            turns.append(entry)
        elif turns and turns[-1][0] == entry:
            turns[-1] = (entry, turns[-1][1] + 1)
        else:
            turns.append((entry, 1))
    assert turns == [
        ("pause", 0.25), ("eager", 3), ("pause", 0.25), ("onnxruntime", 3), ("pause", 0.25), ("lwkernels", 3),
        ("pause", 0.25), ("onnxruntime", 3), ("pause", 0.25), ("lwkernels", 3), ("eager", 3),
        ("lwkernels", 3), ("eager", 3), ("pause", 0.25), ("onnxruntime", 3),
    ]
    assert medians({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}


def test_thread_pools_follow_the_cpu_kernels_backend(monkeypatch):
    import lwkernels.cpu.backend as backend

    assert thread_pool("onnxruntime") == "onnxruntime" and thread_pool("eager") == thread_pool("compile") == "openmp"
    monkeypatch.setattr(backend, "parallel_backend_in_use", lambda: "openmp (libgomp.so.1)")
    assert thread_pool("lwkernels") == thread_pool("lwkernels_channels_last") == "openmp"
    monkeypatch.setattr(backend, "parallel_backend_in_use", lambda: "threadpool")
    assert thread_pool("lwkernels") == "lwkernels"


@pytest.mark.parametrize("name", ["chain", "lightweightnet", "mobilenetv1"])
def test_workloads_pair_the_fused_module_with_its_reference(name):
    from lwkernels.bench.workloads import build_workload

    w = build_workload(name, batch=1)
    modules = dict(w.fused.named_modules())
    assert w.layers and all(path in modules for path in w.layers)
    assert len([p for p in w.layers if p.startswith("features.") or name == "chain"]) == {
        "chain": 9, "lightweightnet": 9, "mobilenetv1": 13}[name]
    with torch.inference_mode():
        expected = w.reference(w.x)
        torch.testing.assert_close(w.fused(w.x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_profile_attributes_ort_nodes_to_the_fused_layer_they_belong_to():
    ort_profile = _load_benchmark_script("ort_profile")
    layers = ["layers.0", "layers.3", "layers.8", "layers.14", "classifier"]
    cases = {
        "/layers/layers.8/layers.8.0/Conv_kernel_time": "layers.8",   # by module path
        "layers/layers.2/Relu_output_0_nchwc_kernel_time": "layers.0",  # the stem's folded activation
        "layers/layers.16/Relu_output_0_nchwc_kernel_time": "layers.14",
        "y_kernel_time": "classifier",                                # the graph's output
        "ReorderOutput_kernel_time": "other: ReorderOutput",
    }
    assert {n: ort_profile._layer_of(n, layers) for n in cases} == cases


def test_torchvision_workload_needs_torchvision_or_says_so():
    from lwkernels.bench.workloads import build_workload

    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="needs an importable torchvision"):
            build_workload("torchvision:mnasnet1_0")
        return
    w = build_workload("torchvision:mnasnet1_0")
    assert w.layers[0] == "layers.0" and w.layers[-1] == "classifier"
    with torch.inference_mode():
        expected = w.reference(w.x)
        torch.testing.assert_close(w.fused(w.x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_ceiling_gemm_is_the_blocks_pointwise_product_and_rows_compare_with_ort():
    ceiling = _load_benchmark_script("cpu_ceiling")
    run = ceiling.gemm_provider(SHAPE, 2)
    y = run()
    w, x = run.operands
    assert w.shape == (SHAPE.out_channels, SHAPE.in_channels) and x.shape == (SHAPE.in_channels, 2 * SHAPE.out_size ** 2)
    torch.testing.assert_close(y, w @ x)
    seconds = {"lwkernels": 1e-3, "onnxruntime": 2e-3, "gemm": 4e-3}
    r = ceiling.row(SHAPE, 2, seconds, fma_peak=100.0)
    assert r["lwkernels_vs_ort"] == pytest.approx(2.0) and r["gemm_vs_ort"] == pytest.approx(0.5)
    assert r["lwkernels_gflops"] == pytest.approx(SHAPE.flops(2) / 1e-3 / 1e9)
    assert r["gemm_gflops"] == pytest.approx(SHAPE.pointwise_flops(2) / 4e-3 / 1e9)
    assert r["onnxruntime_of_peak"] == pytest.approx(r["onnxruntime_gflops"] / 100.0)
    table = ceiling.markdown([r], 100.0)
    assert "2.00x" in table and "0.50x" in table and table.count("\n") == 2


@needs_ort
def test_ceiling_measures_all_three_on_a_block():
    ceiling = _load_benchmark_script("cpu_ceiling")
    seconds = ceiling.measure(SHAPE, 1, rounds=1, min_time=0.01)
    assert set(seconds) == {"lwkernels", "onnxruntime", "gemm"} and all(s > 0 for s in seconds.values())
