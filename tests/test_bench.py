"""The bench's own code, without timing anything: table rows, targets, JSON and the plot from
synthetic samples, and the in-process pieces (roofline bytes, FLOP counting, the decode-step
comparison) on the tiny checkpoint. No assertion here is about speed."""

import json
import math

import pytest

from load_tests import bench_micro, bench_report
from load_tests.bench_report import Run, Sample


def _sample(ttft, gap, tokens, input_tokens=220):
    return Sample(ttft, [ttft + gap * i for i in range(tokens)], input_tokens)


def _runs():
    base = Run("transformers", 1, "448x448", 128, 4.0, [_sample(0.25, 0.009, 128) for _ in range(3)])
    c1 = Run("qwen3vl", 1, "448x448", 128, 4.2, [_sample(0.27, 0.010, 128) for _ in range(3)])
    c8 = Run("qwen3vl", 8, "448x448", 128, 5.0, [_sample(1.0 + 0.1 * i, 0.025, 128) for i in range(16)])
    short = Run("disagg-shm", 8, "448x448", 128, 5.0, [_sample(1.0, 0.03, 100) for _ in range(8)])
    other = Run("transformers", 1, "896x448", 128, 5.0, [_sample(0.5, 0.01, 128, 416) for _ in range(2)])
    return [base, c1, c8, short, other]


MICRO = {"shm_vs_memcpy_ratio": 0.3, "overhead_ms": 2.5, "decode_step_b8_ratio": 0.7}


def test_rows_compare_each_run_with_the_baseline_of_its_image_size():
    table = bench_report.rows(_runs())
    base, c1, c8, short, other = table
    assert base["ratio"] == pytest.approx(1.0)
    assert c8["tokens_per_s"] == pytest.approx(16 * 128 / 5.0)
    assert c8["ratio"] == pytest.approx((16 * 128 / 5.0) / (3 * 128 / 4.0))
    assert c8["requests_per_s"] == pytest.approx(16 / 5.0)
    assert c1["ttft_p50_ms"] == pytest.approx(270.0)
    assert c1["itl_p50_ms"] == pytest.approx(10.0)
    assert c8["ttft_p90_ms"] > c8["ttft_p50_ms"]
    assert short["short_requests"] == 8 and short["output_tokens"] == 100
    assert base["input_tokens"] == 220 and other["input_tokens"] == 416


def test_targets_hold_exactly_the_five_figures_and_say_met_or_missed():
    data = bench_report.report(_runs(), MICRO, {"cores": 2}, {"prefill_floor_ms": 100.0}, "448x448", {})
    assert set(data["targets"]) == {"throughput_c8_ratio", "ttft_c1_ratio", "shm_vs_memcpy_ratio", "overhead_ms",
                                    "decode_step_b8_ratio"}
    assert all(isinstance(v, float) for v in data["targets"].values())
    assert data["targets"]["ttft_c1_ratio"] == pytest.approx(270 / 250)
    assert data["targets_met"] == {"throughput_c8_ratio": True, "ttft_c1_ratio": True, "shm_vs_memcpy_ratio": True,
                                   "overhead_ms": True, "decode_step_b8_ratio": True}
    missed = bench_report.judge({**data["targets"], "overhead_ms": 3.5, "throughput_c8_ratio": float("nan")})
    assert not missed["overhead_ms"] and not missed["throughput_c8_ratio"] and missed["ttft_c1_ratio"]
    assert data["targets_detail"]["overhead_ms"]["status"] == "met"


def test_write_produces_json_png_and_latest(tmp_path):
    runs = _runs()
    micro = {**MICRO, "overhead_ms": float("nan")}  # an unmeasured figure is written as null and missed
    data = bench_report.report(runs, micro, {"cores": 2, "torch": "x"}, {"decode_b8_floor_ms": 6.5}, "448x448",
                               {"quick": True})
    paths = bench_report.write(data, tmp_path, "test")
    latest = json.loads((tmp_path / "bench-latest.json").read_text())
    assert latest == json.loads(paths["json"].read_text())
    assert latest["targets"]["overhead_ms"] is None and latest["targets_met"]["overhead_ms"] is False
    assert len(latest["table"]) == len(runs) and latest["runs"][2]["samples"][0]["ttft"] == 1.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "bench-latest.png").is_file()
    text = bench_report.render_text(data)
    assert "throughput_c8_ratio" in text and "MISSED" in text and "x baseline" in text


def test_decode_step_bytes_counts_experts_touched(spec):
    b1 = bench_micro.decode_step_bytes(spec, 1, 100)
    b8 = bench_micro.decode_step_bytes(spec, 8, 100)
    assert b1["experts_per_layer"] == pytest.approx(spec.experts_per_token)
    assert spec.experts_per_token < b8["experts_per_layer"] <= spec.num_experts
    assert b8["weights"] > b1["weights"] and b8["kv_cache"] == 8 * b1["kv_cache"]


def test_flop_counter_counts_a_matmul():
    import torch

    a, b = torch.ones(4, 8), torch.ones(8, 3)
    assert bench_micro.count_flops(lambda: a @ b) == 2 * 4 * 8 * 3


def test_decode_step_comparison_runs_on_the_tiny_checkpoint(tiny_checkpoint):
    out = bench_micro.decode_step(tiny_checkpoint, context=16, batch=8, repeats=2, log=lambda *_: None)
    for key in ("engine_b8_ms", "transformers_b8_ms", "engine_b1_ms", "transformers_b1_ms"):
        assert out[key] > 0 and math.isfinite(out[key])
    assert out["decode_step_b8_ratio"] == pytest.approx(out["engine_b8_ms"] / out["transformers_b8_ms"])


def test_every_configuration_measures_what_the_targets_need():
    from load_tests.bench import Config
    from load_tests.bench_load import workload

    for quick in (True, False):
        cfg = Config.make(quick)
        assert {1, 8} <= set(cfg.concurrency) and (448, 448) in cfg.sizes and cfg.max_tokens == 128
    assert workload((64, 32), 3) == workload((64, 32), 3)  # seeded: every run sends the same requests


def test_the_overhead_floor_serves_the_ensemble_while_its_models_do_no_work(tiny_checkpoint, tmp_path_factory):
    """The floor server behind overhead_floor_ms: same ensemble and tensors, no engine."""
    import urllib.request

    from load_tests.bench import floor_repository
    from load_tests.bench_load import OpenStream
    from tests.conftest import start_server
    from tests.oracle import image_bytes

    server = start_server(tiny_checkpoint, tmp_path_factory, "single", "floor", prepare=floor_repository)
    try:
        repo = server.repository
        assert all((repo / m / "1" / "real_model.py").is_file() for m in ("preprocessing", "vision_encoder"))
        stream = OpenStream(server.grpc_url)
        try:
            counts = [stream.generate(f"Request {i}.", [image_bytes(64, 64, i)], 1) for i in range(3)]
        finally:
            stream.close()
        assert counts == [1, 1, 1]  # one token response each, through all four steps
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "nv_inference_request_success" in metrics
        assert "qwen3vl_engine_steps_total" not in metrics  # no engine ran
    finally:
        server.stop()


def test_host_load_tells_other_processes_cpu_from_the_benchs_own():
    import subprocess
    import sys
    import time

    from load_tests.bench import HostLoad

    def burn(seconds):
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            pass

    own = HostLoad()
    burn(1.0)  # this process: the bench's own work
    subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)  # a reaped child: also its own
    mine = own.share()["other_processes_cpu_share"]
    one_core = 1.0 / (1.0 * own.cores)  # the share 1 s of one core would show as if it were foreign
    assert mine < 0.5 * one_core

    other = HostLoad()
    # a process that is not the bench's child: forked by a child that exits at once (never reaped by us)
    subprocess.run([sys.executable, "-c", "import os, time\nif os.fork() == 0:\n    t0 = time.monotonic()\n"
                    "    while time.monotonic() - t0 < 1.5:\n        pass\n    os._exit(0)\n"], check=True)
    time.sleep(1.8)
    shares = other.share()
    assert shares["other_processes_cpu_share"] > 0.5 * 1.5 / (1.8 * other.cores)
    warned = HostLoad.warnings({"other_processes_cpu_share": 0.3, "steal_cpu_share": 0.0})
    assert len(warned) == 1 and "other processes used 30%" in warned[0]
    assert HostLoad.warnings({"other_processes_cpu_share": 0.01, "steal_cpu_share": 0.01}) == []


def test_a_jittery_baseline_is_flagged():
    from load_tests.bench import baseline_jitter_warnings

    def row(mode, p50, p90, image="448x448"):
        return {"mode": mode, "itl_p50_ms": p50, "itl_p90_ms": p90, "image": image}

    quiet = [row("transformers", 8.05, 8.38), row("qwen3vl", 6.4, 9.9), row("transformers", 7.97, 8.59, "896x448")]
    assert baseline_jitter_warnings(quiet) == []  # the server's own spread is not the host's
    warned = baseline_jitter_warnings(quiet + [row("transformers", 8.68, 12.17)])
    assert len(warned) == 1 and "1.40x its p50 (448x448)" in warned[0]
