"""How a cluster's language servers shared the sequences of a run: each one's
`qwen3vl_language_sequences_started_total` (read from its /metrics, ports from the cluster.json
that `make cluster` writes) before and after, and its count against the mean of them all.

The issue's target: every language server between 0.5x and 1.5x the mean. A sequence that moved
(migration) counts on every server it started on.
"""

from __future__ import annotations

import json
from pathlib import Path

from load_tests.cache_ttft import counter

METRIC = "qwen3vl_language_sequences_started_total"
BOUNDS = (0.5, 1.5)  # each server's sequences / the mean


def read_cluster(path: str | Path) -> list[dict]:
    """cluster.json's servers (role, name, pid, http, grpc, metrics, ...); ValueError if it lists none
    of a role."""
    servers = json.loads(Path(path).read_text())
    for role in ("encoder", "language"):
        if not any(s.get("role") == role for s in servers):
            raise ValueError(f"{path}: no {role} server in it")
    return servers


def name_of(server: dict) -> str:
    return server.get("name") or f"{server['role']}@{server['grpc']}"


def sequences_started(servers: list[dict], host: str = "127.0.0.1") -> dict[str, float]:
    """Each language server's sequences started so far (name -> count)."""
    return {name_of(s): counter(f"{host}:{s['metrics']}", METRIC) for s in servers if s["role"] == "language"}


def spread(before: dict[str, float], after: dict[str, float], bounds: tuple[float, float] = BOUNDS) -> dict:
    """Per language server: the sequences it started between the two readings and that count over
    the mean; `within`: every share inside `bounds` (False when no sequence started at all)."""
    counts = {name: after[name] - before.get(name, 0.0) for name in after}
    total = sum(counts.values())
    mean = total / len(counts) if counts else 0.0
    servers = {name: {"sequences": int(n), "share_of_mean": n / mean if mean else float("nan")}
               for name, n in counts.items()}
    within = mean > 0 and all(bounds[0] <= s["share_of_mean"] <= bounds[1] for s in servers.values())
    return {"metric": METRIC, "servers": servers, "total": int(total), "mean": mean, "bounds": list(bounds),
            "within": within}


def format_spread(s: dict) -> str:
    lines = [f"{'language server':<16} {'sequences':>9} {'x mean':>7}"]
    for name, v in s["servers"].items():
        lines.append(f"{name:<16} {v['sequences']:>9} {v['share_of_mean']:>7.2f}")
    low, high = s["bounds"]
    lines.append(f"{s['total']} sequences over {len(s['servers'])} language servers, mean {s['mean']:.1f}: "
                 + ("every server within" if s["within"] else "NOT every server within")
                 + f" {low:g}x-{high:g}x of the mean")
    return "\n".join(lines)
