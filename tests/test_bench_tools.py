"""tools/bench.py on tiny shapes, one repeat: every benchmark runs, its JSON names the CPU
model and the BLAS kernel, carries its ceilings, and no fraction of a ceiling exceeds 1.0;
a fraction above 1.0 stops the run with a one-line error. (Speed itself is measured by
running the benchmarks, never asserted here.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import DATA, ROOT, data_path

import npgpt.kernels.numpy_fast as fast

TOOLS = ROOT / "tools"


@pytest.fixture
def bench(monkeypatch, capsys):
    """Run `tools/bench.py <args>` in this process; returns (exit code, JSON or None, stderr)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench as cli

    def run(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if out.strip() else None), err

    return run


def fractions(report, path=""):
    """Every (path, value) whose key starts with fraction_of, anywhere in the report."""
    items = report.items() if isinstance(report, dict) else enumerate(report) if isinstance(report, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from fractions(value, f"{path}.{key}")
        elif str(key).startswith("fraction_of"):
            yield f"{path}.{key}", value


def check_report(report, ceiling_key):
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_model"] != "unknown"
    if os.path.exists("/proc/cpuinfo") and "vendor_id" in open("/proc/cpuinfo").read():  # x86 Linux: the generation too
        assert re.fullmatch(r"\S+ family \d+ model \d+ stepping \d+", machine["cpu_id"]), machine["cpu_id"]
    assert machine["blas_kernel"] and "/" in machine["blas_kernel"]
    assert machine["date_utc"] and len(machine["loadavg_1_5_15_end"]) == 3
    for row in report["results"]:
        assert row[ceiling_key] > 0
    found = list(fractions(report))
    assert found, "the report has no fraction of a ceiling"
    assert all(0 < v <= 1.0 for _, v in found), found


def test_forward_tiny(bench):
    code, report, err = bench("forward", "--preset", "tiny", "--shapes", "2x16", "--threads", "1", "--repeats", "1", "--no-memory")
    assert code == 0, err
    check_report(report, "gemm_ceiling_gflops")
    row = report["results"][0]
    assert row["gemm_ceiling_gflops"] >= row["gemm_gflops_numpy_or_backend"]  # the best of NumPy and torch
    assert "BLAS kernel" in err and report["machine"]["cpu_model"] in err


def test_train_tiny_vs_torch_at_two_thread_counts(bench):
    code, report, err = bench("train", "--configs", "tiny", "--vs", "torch", "--threads", "1", "2", "--repeats", "1", "--no-memory")
    assert code == 0, err
    check_report(report, "gemm_ceiling_gflops")
    assert [row["threads"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["ratio_npgpt_over_torch"] > 0 and "gemm_gflops_torch" in row
        assert row["first_step_loss"]["npgpt"] == pytest.approx(row["first_step_loss"]["torch"], rel=1e-4)


def test_generate_bandwidth_is_a_gemv_over_4x_the_llc(bench):
    """The 124M shape (weights far above the last-level cache), two new tokens; three decode
    steps split into their products and the rest."""
    code, report, err = bench("generate", "--threads", "1", "--repeats", "1", "--prompt-tokens", "2", "--new-tokens", "2",
                              "--ttft-tokens", "0", "--recompute-repeats", "0", "--step-profile", "3")  # fmt: skip
    assert code == 0, err
    check_report(report, "bandwidth_ceiling_gb_s")
    row = report["results"][0]
    profile = row["decode_step_profile"]
    # with numba (the test extras) a step runs in one compiled call, else its products are timed one by one
    assert profile["compiled_step"] == (fast.compiled_step() is not None)
    part = "compiled" if profile["compiled_step"] else "products"
    assert profile["steps"] == 3 and profile[part + "_ms"] > 0 and profile["rest_ms"] > 0 and profile[part + "_gb_s"] > 0
    assert row["weights_stream_from_memory"] and row["gemv_bytes"] >= 4 * report["machine"]["llc_bytes"]
    assert "gemv_gb_s_torch_mv" not in row  # torch.mv only under --vs torch
    # a ceiling sample before the warm-up, before the timed run and after it: the run's fraction
    # is against the larger of the two next to it; the best sample is the run's ceiling
    samples, cached = row["bandwidth_ceiling_samples_gb_s"], row["cached"]
    assert len(samples) == 3 and row["bandwidth_ceiling_gb_s"] == max(samples)
    pairs = cached["fraction_of_adjacent_ceiling"]
    assert len(pairs["per_run"]) == 1 and pairs["median"] == pairs["per_run"][0]
    assert pairs["median"] * max(samples[1:]) == pytest.approx(cached["fraction_of_bandwidth_ceiling"] * max(samples))
    assert len(cached["decode_only_fraction_of_adjacent_ceiling"]["per_run"]) == 1
    assert "against the ceiling next to each run" in err


def test_generate_and_train_on_another_backend(bench):
    """--backend: the fake CuPy (NumPy underneath) stands in for a GPU; torch has no CUDA here, so it is skipped."""
    code, report, err = bench("generate", "--backend", "fake-cupy", "--preset", "tiny", "--repeats", "1",
                              "--prompt-tokens", "4", "--new-tokens", "3", "--ttft-tokens", "0", "--recompute-repeats", "0")  # fmt: skip
    assert code == 0, err
    row = report["results"][0]
    assert row["bandwidth_ceiling_gb_s"] > 0 and not row["weights_stream_from_memory"]  # tiny weights stay in cache:
    assert not list(fractions(report))  # memory bandwidth bounds nothing, so no fraction of it is claimed
    assert report["backend"].startswith("fake-cupy") and "npgpt_peak_device_bytes" in report
    code, report, err = bench("train", "--backend", "fake-cupy", "--configs", "tiny", "--repeats", "1")
    assert code == 0, err
    check_report(report, "gemm_ceiling_gflops")


def test_a_fraction_above_one_stops_the_benchmark(bench, monkeypatch):
    import bench_forward

    monkeypatch.setattr(bench_forward, "gemm_ceiling", lambda *a, **k: {"gemm_ceiling_gflops": 1e-9, "gemm_gflops_numpy_or_backend": 1e-9})
    code, report, err = bench("forward", "--preset", "tiny", "--shapes", "1x8", "--threads", "1", "--repeats", "1", "--no-memory")
    assert code == 1 and report is None
    assert err.strip().splitlines()[-1].startswith("error: ") and "fraction_of_gemm_ceiling" in err and "Traceback" not in err


def test_a_ceiling_below_a_reached_rate_is_sampled_again_longer(monkeypatch):
    """gemm_ceiling samples again (4x longer each time, at most twice) while a timed run beat
    it, and keeps the highest; a ceiling above the reached rate is taken at once."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import benchlib

    calls = []

    def once(*args):
        calls.append(args[-1])  # min_total_s
        return {"gemm_ceiling_gflops": [5.0, 9.0, 7.0][len(calls) - 1]}

    monkeypatch.setattr(benchlib, "gemm_ceiling_once", once)
    assert benchlib.gemm_ceiling([], None, reached_gflops=100.0)["gemm_ceiling_gflops"] == 9.0
    assert calls == [benchlib.CEILING_SAMPLING_S, 4 * benchlib.CEILING_SAMPLING_S, 16 * benchlib.CEILING_SAMPLING_S]
    calls.clear()
    assert benchlib.gemm_ceiling([], None, reached_gflops=4.0)["gemm_ceiling_gflops"] == 5.0 and len(calls) == 1


def test_check_fractions_walks_nested_reports(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    from benchlib import BenchError, check_fractions

    check_fractions({"rows": [{"npgpt": {"fraction_of_gemm_ceiling": 0.99}}]})
    with pytest.raises(BenchError, match=r"rows\.0\.npgpt\.fraction_of_gemm_ceiling = 1\.200"):
        check_fractions({"rows": [{"npgpt": {"fraction_of_gemm_ceiling": 1.2}}]})
    check_fractions({"cached": {"decode_only_fraction_of_adjacent_ceiling": {"per_run": [0.7, 0.99], "median": 0.85}}})
    with pytest.raises(BenchError, match=r"cached\.fraction_of_adjacent_ceiling\.per_run\.1 = 1\.010"):  # each run's, nested
        check_fractions({"cached": {"fraction_of_adjacent_ceiling": {"per_run": [0.7, 1.01], "median": 0.85}}})
    with pytest.raises(BenchError, match=r"decode_only_fraction_of_bandwidth_ceiling = 1\.100"):  # not only a leading fraction_of
        check_fractions({"cached": {"decode_only_fraction_of_bandwidth_ceiling": 1.1}})


def test_cli_runs_as_a_script_and_errors_in_one_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends" / "cupy")]), "NPGPT_DATA": str(DATA)}
    out = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "forward", "--preset", "no-such-model"],
                         capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 1 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = subprocess.run([sys.executable, str(TOOLS / "bench.py")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2 and all(name in out.stdout for name in ("forward", "train", "generate", "tokenizer"))


@pytest.mark.filterwarnings("ignore:the corpus ran out of pairs")
def test_tokenizer_small(bench):
    data_path("gpt2/gpt2.tiktoken")
    data_path("corpora/tinyshakespeare.txt")
    code, report, err = bench("tokenizer", "--max-chars", "3000", "--repeats", "1", "--train-repeats", "1", "--data", DATA)
    assert code == 0, err
    assert report["ids_identical_to_tiktoken_and_baseline"] and report["machine"]["cpu_model"]


def test_scale_reports_the_ratio_and_the_overlap_from_the_slowest_ranks_wait(bench):
    """tools/bench.py scale on the tiny config, each way once: the report's structure and
    its arithmetic (no timing is asserted)."""
    pytest.importorskip("mpi4py")
    code, report, err = bench("scale", "--configs", "tiny", "--rounds", "1", "--steps", "2", "--no-zero-memory")
    assert code == 0, err
    row = report["configs"]["tiny"]
    assert (row["1x2"]["ranks"], row["2x1"]["ranks"], row["2x1_overlap"]["ranks"]) == (1, 2, 2)
    assert row["2x1_overlap"]["overlap"] and not row["2x1"]["overlap"]
    assert row["ratio_2x1_over_1x2"] == row["2x1"]["tokens_per_s"] / row["1x2"]["tokens_per_s"]
    for name in ("2x1", "2x1_overlap"):  # the exposed wait: per step, the least of the ranks' waits
        assert len(row[name]["exposed_comm_steps_s"]) == 2 and row[name]["exposed_comm_s"] <= row[name]["comm_wait_s"] + 1e-12
    o = row["overlap"]
    assert o["exposed_after_backward_s"] == row["2x1"]["exposed_comm_s"] and o["exposed_overlapped_s"] == row["2x1_overlap"]["exposed_comm_s"]
    assert o["hidden_s"] == pytest.approx(o["exposed_after_backward_s"] - o["exposed_overlapped_s"])
    assert o["allreduce_alone_s"] > 0
    assert "2x1_overlap / 1x2 tokens/s = " in err and "(goal on config c: >= 0.9)" in err and "hidden" in err


def test_eval_tiny(bench, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:3000], "utf-8")
    code, report, err = bench("eval", "--data", text, "--threads", "1", "--repeats", "1")
    assert code == 0, err
    assert report["machine"]["cpu_model"] and "/" in report["machine"]["blas_kernel"]
    (run,) = report["runs"]
    assert run["stride"] == run["context"] == 128 and run["tokens"] > 500 and run["wall_s"] >= run["scoring_s"] > 0
    assert run["cpu_s"] > 0 and run["cores_used"] > 0
    assert len(run["loadavg_1_5_15_before"]) == 3
    code, _, err = bench("eval", "--data", tmp_path / "missing.txt", "--repeats", "1")
    assert code == 1 and err.startswith("error: no text file")


def test_eval_runs_threads_and_processes_round_robin(bench, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:3000], "utf-8")
    code, report, err = bench("eval", "--data", text, "--threads", "1", "2", "--workers", "threads", "processes", "--repeats", "1")
    assert code == 0, err
    assert [(r["threads"], r["workers"]) for r in report["runs"]] == [(1, "threads"), (2, "threads"), (2, "processes")]
    assert len({r["loss"] for r in report["runs"]}) == 1  # the same loss, to the last digit
    assert set(report["by_threads"]) == {"1", "2", "2 processes"} and "2 processes: median" in err


def test_eval_kernels_vs_a_git_ref_alternates_the_two_sets(bench, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:3000], "utf-8")
    code, report, err = bench("eval", "--data", text, "--kernels-vs", "HEAD", "--max-tokens", "300", "--repeats", "2")
    assert code == 0, err
    assert report["tokens"] == 300 and report["threads"] == 1 and set(report["loss"]) == {"HEAD", "working tree"}
    assert all(len(v) == 2 and min(v) > 0 for v in report["cpu_us_per_token"].values()) and len(report["ratios"]) == 2
    assert "working tree / HEAD: median per-pair ratio" in err
    code, _, err = bench("eval", "--data", text, "--kernels-vs", "no-such-ref", "--repeats", "1")
    assert code == 1 and err.startswith("error: git show no-such-ref")


def test_train_profile_times_every_kernel_the_step_calls(bench):
    code, report, err = bench("train", "--profile", "--configs", "tiny", "--threads", "1", "2", "--repeats", "1")
    assert code == 0, err
    assert report["machine"]["cpu_model"] and [row["threads"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        kernels = row["kernels"]
        for name in ("linear_forward", "linear_backward", "attention_backward", "adamw_update", "sum_of_squares", "untimed"):
            assert kernels[name]["cpu_s"] >= 0 and kernels[name]["wall_s"] > 0, name
        assert kernels["linear_backward"]["calls"] == 4 * 2  # 4 linear layers x 2 blocks, one step
        assert row["step_wall_s"] >= sum(k["wall_s"] for n, k in kernels.items() if n != "untimed") > 0
        split = row["train_pieces"]  # tiny's batch is too small to split: one piece of both rows
        assert [p["rows"] for p in split["pieces"]] == [[0, 2]] and 0 < split["span_s"] <= row["step_wall_s"]
        assert split["pieces"][0]["wall_s"] <= split["span_s"] and split["outside_s"] > 0
        if "ran_s" in split["pieces"][0]:  # Linux
            assert 0 < split["pieces"][0]["ran_s"] <= split["pieces"][0]["wall_s"] + 1e-3
        assert row["step_system_cpu_s"] >= 0 and row["step_minor_faults"] >= 0
    assert "profile tiny threads 2" in err and "pieces' span" in err and "page faults" in err


def test_generate_vs_torch_past_the_context_is_a_one_line_error(bench):
    """transformers has no sliding window: prompt + new tokens past tiny's 64-token context stop before any work."""
    code, report, err = bench("generate", "--preset", "tiny", "--vs", "torch", "--threads", "1", "--ttft-tokens", "0")
    assert code == 1 and report is None
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "32 + 128" in last and "context 64" in last and "Traceback" not in err


def test_best_seconds_samples_until_the_minimum_total(monkeypatch):
    """A ceiling keeps sampling a short call until min_total_s has passed (on a fake clock),
    so a burst of another process's work cannot fall on every sample."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import benchlib

    now = [0.0]

    def clock():  # every reading 1 ms later
        now[0] += 1e-3
        return now[0]

    calls = []
    monkeypatch.setattr(benchlib.time, "perf_counter", clock)
    benchlib.best_seconds(lambda: calls.append(1), repeats=3, min_sample_s=1e-3)
    few = len(calls)
    calls.clear()
    benchlib.best_seconds(lambda: calls.append(1), repeats=3, min_sample_s=1e-3, min_total_s=0.1)
    assert few == 2 + 3 and len(calls) > 2 + 30  # warm-ups + samples of one call each
