"""The `lwkernels` command line: info, bench (inference and training tables), bad options."""
import json

import pytest
import torch

from helpers import run_python
from lwkernels.cli.main import main


def test_info_names_the_cpu_path(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU path" in out and "lwkernels" in out and "triton" in out


def test_bench_checks_then_prints_a_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--shapes", "lightweightnet32", "--no-compile", "--min-time", "0.01", "--threads", "1",
                 "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "checked: fused == reference on all 9 shapes" in out
    assert "geometric mean speedup" in out
    report = json.loads(path.read_text())
    assert len(report["rows"]) == 9 and report["chain"]["ms"]["lwkernels"] > 0
    assert report["environment"]["cpu_path"] in ("scalar", "avx2", "avx512", "neon")
    # The ceiling: each block's pointwise GEMM at the torch.mm rate measured in the same run.
    assert "ceiling: torch.mm runs at" in out and report["matmul_gflops"] > 0
    from lwkernels.models.shapes import lightweightnet_blocks
    for shape, row in zip(lightweightnet_blocks(32), report["rows"]):
        assert shape.pointwise_flops(1) == 2 * shape.out_size ** 2 * shape.in_channels * shape.out_channels
        floor = shape.pointwise_flops(1) / (report["matmul_gflops"] * 1e9) * 1e3
        assert row["pointwise_floor_ms"] == pytest.approx(floor)
        assert row["max_speedup_vs_eager"] == pytest.approx(row["ms"]["eager"] / floor)


def test_bench_reports_bad_options_without_a_traceback(capsys):
    assert main(["bench", "--batch", "0"]) == 2
    assert "--batch must be positive" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_missing_cuda_says_so(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    result = run_python(["-m", "lwkernels", "info"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CPU path" in result.stdout


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_version(capsys):
    import lwkernels

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lwkernels {lwkernels.__version__}"
