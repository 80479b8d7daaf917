"""The soak (load_tests/soak.py), short: both paths at once with good, malformed, cancelled and
abandoned requests and transfer faults; no wrong output, no failed good request, and every server
process back where it started (memory, threads, descriptors, shared memory). `make soak` runs 1,000."""

import pytest

from load_tests.soak import IDLE_US, LIMITS, soak, table, verdict
from tests.conftest import start_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def soak_servers(tiny_checkpoint, tmp_path_factory):
    """Its own three servers (the language server expires abandoned sequences within the run)."""
    common = dict(max_output_len=64, max_seq_len=1024)
    servers = {"single": start_server(tiny_checkpoint, tmp_path_factory, "single", "soak-single", **common),
               "encoder": start_server(tiny_checkpoint, tmp_path_factory, "encoder", "soak-encoder", **common),
               "language": start_server(tiny_checkpoint, tmp_path_factory, "language", "soak-language",
                                        sequence_idle_us=IDLE_US, **common)}
    yield servers
    for srv in servers.values():
        srv.stop()


def test_a_short_soak_gives_no_wrong_output_and_leaves_every_server_process_as_it_was(soak_servers):
    report = soak(soak_servers, sequences=150, workers=4, seed=1, log=lambda *_: None)
    print(table(report))
    assert verdict(report) == [], table(report)
    assert report["wrong_outputs"] == 0 and report["failed_good_requests"] == 0
    assert report["good_requests"] >= 50
    assert all(c["count"] > 0 for c in report["by_kind"].values()), report["by_kind"]  # every kind ran
    processes = report["snapshots"]["end"]["language"]["processes"]
    assert sum(name.startswith("stub ") for name in processes) == 3  # language, tensorrt_llm, postprocessing
    assert set(LIMITS) == {"rss_mib", "threads", "fds", "shm_files"}
