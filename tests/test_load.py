"""Load tests: the seeded workload, the bounded runner, and a ~20 s Locust smoke run (HTTP and gRPC users)
against the real server that must end in time with zero failures."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from load_tests.run import parse_args, read_stats, run_bounded, summary_table, user_classes
from load_tests.workload import Workload, image_sizes, pixel_limits

ROOT = Path(__file__).resolve().parent.parent

SMOKE_USERS = 4  # two HTTP, two gRPC
SMOKE_SECONDS = 20
SMOKE_STOP_TIMEOUT = 10
SMOKE_GRACE = 40  # Locust start-up (imports, workload images) and reports


# -- the workload ------------------------------------------------------------------------------------
def test_pixel_limit_comes_from_the_checkpoint(tiny_checkpoint):
    pre = json.loads((Path(tiny_checkpoint) / "preprocessor_config.json").read_text())
    assert pixel_limits(tiny_checkpoint) == (pre["size"]["shortest_edge"], pre["size"]["longest_edge"])


@pytest.mark.parametrize("count, max_pixels, min_pixels", [(4, 65536, 4096), (5, 16777216, 65536), (1, 100, None),
                                                           (3, 5000, 4096)])
def test_image_sizes_run_from_small_to_the_pixel_limit(count, max_pixels, min_pixels):
    sizes = image_sizes(count, max_pixels, min_pixels)
    pixels = [w * h for w, h in sizes]
    assert len(sizes) == count
    assert all(p <= max_pixels for p in pixels)
    assert pixels == sorted(pixels)
    assert pixels[-1] >= 0.95 * max_pixels  # the largest is at the limit, within rounding
    if count > 1:
        assert pixels[0] <= 1.1 * min_pixels


def test_workload_mixes_text_one_and_two_images_and_is_seeded(tiny_checkpoint):
    lo, hi = pixel_limits(tiny_checkpoint)
    a, b, c = (Workload.build(hi, lo, seed=s, max_tokens=16) for s in (7, 7, 8))
    assert {case.kind for case in a.cases} == {"text", "1 image", "2 images"}
    assert [case.images for case in a.cases] == [case.images for case in b.cases]  # same seed, same bytes
    assert [case.images for case in a.cases] != [case.images for case in c.cases]
    assert all(w * h <= hi for case in a.cases for w, h in case.sizes)
    assert max(w * h for case in a.cases for w, h in case.sizes) >= 0.95 * hi
    # each kind is a third of the requests
    import random

    rng = random.Random(0)
    picks = [a.pick(rng).kind for _ in range(3000)]
    for kind in ("text", "1 image", "2 images"):
        assert 0.28 < picks.count(kind) / len(picks) < 0.39


# -- the bound ---------------------------------------------------------------------------------------
def test_run_bounded_stops_a_process_that_overruns():
    t0 = time.monotonic()
    done = run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1, term_grace=2)
    assert done.timed_out and done.returncode == -signal.SIGTERM
    assert time.monotonic() - t0 < 10


def test_run_bounded_kills_a_process_that_ignores_sigterm():
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    t0 = time.monotonic()
    done = run_bounded([sys.executable, "-c", code], timeout=1.5, term_grace=1)
    assert done.timed_out and done.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


def test_make_load_test_passes_users_duration_and_url():
    out = subprocess.run(["make", "-n", "load-test", "USERS=3", "DURATION=7", "URL=example:8000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "-m load_tests.run --users 3 --duration 7 --url example:8000" in out.stdout


def test_make_load_test_and_bench_cluster_pass_the_cluster():
    out = subprocess.run(["make", "-n", "load-test", "bench-cluster", "CLUSTER=build/cluster.json", "QUICK=1",
                          "LANGUAGES=4"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.replace("\\\n", " ").split())
    assert "-m load_tests.run --users 4 --duration 30 --cluster build/cluster.json" in text
    assert "-m load_tests.bench_cluster --quick --encoders 2 --languages 4" in text


# -- a running cluster (cluster.json) -----------------------------------------------------------------
CLUSTER = [{"role": "language", "name": "language-0", "pid": 1, "http": 1, "grpc": 2, "metrics": 3},
           {"role": "encoder", "name": "encoder-0", "pid": 2, "http": 8000, "grpc": 8001, "metrics": 8002,
            "openai": 9000},
           {"role": "encoder", "name": "encoder-1", "pid": 3, "http": 4, "grpc": 5, "metrics": 6}]


def test_a_cluster_run_loads_every_encoder_and_the_front_doors_openai_endpoint(tmp_path):
    from load_tests.run import cluster_urls

    args = parse_args(["--cluster", "build/cluster.json"])
    assert args.model == "qwen3vl_disagg" and args.url is None
    assert parse_args(["--cluster", "c.json", "--model", "qwen3vl"]).model == "qwen3vl"
    assert cluster_urls(CLUSTER) == ("127.0.0.1:8000,127.0.0.1:4", "127.0.0.1:8001,127.0.0.1:5", "127.0.0.1:9000")
    assert cluster_urls(CLUSTER, "h:1")[2] == "h:1"
    with pytest.raises(SystemExit):
        parse_args(["--cluster", "c.json", "--url", "h:8000"])


def test_a_cluster_file_without_language_servers_is_refused(tmp_path):
    from load_tests import spread

    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(CLUSTER[1:]))
    with pytest.raises(ValueError, match="no language server"):
        spread.read_cluster(path)
    path.write_text(json.dumps(CLUSTER))
    assert [s["name"] for s in spread.read_cluster(path)] == ["language-0", "encoder-0", "encoder-1"]


def test_the_spread_is_each_language_servers_sequences_over_the_mean():
    from load_tests.spread import format_spread, spread

    s = spread({"a": 10, "b": 0, "c": 3}, {"a": 14, "b": 6, "c": 8})  # 4, 6, 5: mean 5
    assert s["total"] == 15 and s["mean"] == 5
    assert {k: v["sequences"] for k, v in s["servers"].items()} == {"a": 4, "b": 6, "c": 5}
    assert s["servers"]["a"]["share_of_mean"] == pytest.approx(0.8) and s["within"]
    uneven = spread({}, {"a": 1, "b": 9, "c": 5})  # 0.2x and 1.8x the mean
    assert not uneven["within"] and "NOT every server within 0.5x-1.5x" in format_spread(uneven)
    assert not spread({"a": 2, "b": 2}, {"a": 2, "b": 2})["within"]  # nothing started: nothing shown


# -- which user classes run ---------------------------------------------------------------------------
def test_every_user_class_runs_when_there_are_enough_users():
    assert user_classes(parse_args(["--users", "3"]), "127.0.0.1:9000") == (
        ["HttpGenerateUser", "GrpcGenerateUser", "OpenAIChatUser"], {})


def test_fewer_users_than_classes_skips_the_rest_and_says_why():
    classes, skipped = user_classes(parse_args(["--users", "2"]), "127.0.0.1:9000")
    assert classes == ["HttpGenerateUser", "GrpcGenerateUser"]
    assert skipped == {"OpenAIChatUser": "2 user(s) for 3 user classes: give --users 3 or more to run every class"}
    row = summary_table({}, 2, skipped).splitlines()[4]
    assert row.startswith("OpenAI") and row.endswith("skipped: 2 user(s) for 3 user classes: give --users 3 or "
                                                      "more to run every class")


def test_the_openai_user_is_skipped_by_name_without_an_endpoint():
    classes, skipped = user_classes(parse_args(["--users", "4", "--url", "h:8000"]), None)
    assert classes == ["HttpGenerateUser", "GrpcGenerateUser"]
    assert skipped["OpenAIChatUser"].startswith("no OpenAI endpoint")


def test_an_unknown_user_class_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["HttpUser"])
    assert "unknown user class HttpUser: choose from HttpGenerateUser, GrpcGenerateUser, OpenAIChatUser" in (
        capsys.readouterr().err)


# -- the smoke run -----------------------------------------------------------------------------------
@pytest.mark.server
def test_locust_smoke_run_http_and_grpc_zero_failures(server, tiny_checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "load_tests.run", "--users", str(SMOKE_USERS), "--duration", str(SMOKE_SECONDS),
           "--stop-timeout", str(SMOKE_STOP_TIMEOUT), "--grace", str(SMOKE_GRACE),
           "--url", server.http_url, "--grpc-url", server.grpc_url, "--checkpoint", str(tiny_checkpoint),
           "--max-tokens", "16", "--reports", str(tmp_path), "--prefix", "smoke"]
    bound = SMOKE_SECONDS + SMOKE_STOP_TIMEOUT + SMOKE_GRACE
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=bound + 30)
    wall = time.monotonic() - t0
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < bound, f"the run took {wall:.0f}s"

    stats = read_stats(tmp_path / "smoke_stats.csv")
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0
    for kind in ("HTTP", "gRPC"):
        for name in ("generate", "ttft", "itl"):
            assert int(stats[(kind, name)]["Request Count"]) > 0, f"no {kind} {name} entries"
        gen = stats[(kind, "generate")]
        assert int(gen["Failure Count"]) == 0
        assert 1 <= float(gen["Average Content Size"]) <= 16  # streamed responses per request, <= max_tokens
    assert (tmp_path / "smoke.html").is_file()
    table = summary_table(stats)
    assert table.splitlines()[2].startswith("HTTP") and table.splitlines()[3].startswith("gRPC")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", ["serving_cost", "engine_step", "ggml_step"])
def test_a_tool_without_its_checkpoint_says_in_one_line_how_to_make_it(tool, tmp_path):
    missing = tmp_path / "small"
    out = subprocess.run([sys.executable, "-m", f"load_tests.{tool}", str(missing)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: checkpoint directory {missing} does not exist; make one with "
                                       "`make checkpoint PROFILE=small` (writes checkpoints/small) or "
                                       f"`qwen3vl-build-checkpoint --profile small --out {missing}`"]


def test_the_turns_bench_refuses_what_no_correct_run_shows():
    from load_tests.disagg_turns import check

    good = {"rows": {"turn1": [0.4], "turn2": [0.1], "rows1": [1024], "rows2": [0]},
            "plain": {"turn1": [0.4], "turn2": [0.2], "rows1": [1024], "rows2": [1024]}}
    assert check(good) == []
    moved = {**good, "rows": {**good["rows"], "rows2": [256]}}
    assert check(moved) == ["rows: a turn 2 moved rows [256] (the server held its image)"]
    instant = {**good, "plain": {**good["plain"], "turn2": [0.0]}}
    assert check(instant) == ["plain: a time to first token <= 0"]
    nothing = {**good, "plain": {**good["plain"], "rows1": [0]}}
    assert check(nothing) == ["plain: a turn 1 moved no rows (its image is new)"]
