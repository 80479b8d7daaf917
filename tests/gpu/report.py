"""The device check's part reports: one JSON object per part, and one line a person reads.

Every part ends with PASS, FAIL or SKIP, its figures and, unless it passed, the reason."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

STATUSES = ("PASS", "FAIL", "SKIP")


class Part:
    """Collects one part's figures and checks; `finish` writes `<report>` and prints the verdict.

    A check that fails makes the part FAIL but the part goes on with its other checks; an
    exception escaping the `with` block ends the part as FAIL with its message (and the traceback
    in the report), never as a crash without a report."""

    def __init__(self, name: str, report: str | Path | None):
        self.name, self.report = name, Path(report) if report else None
        self.figures: dict = {}
        self.checks: list[dict] = []
        self.status: str | None = None
        self.reason = ""
        self.t0 = time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)

    def check(self, what: str, ok: bool, detail: str = "", **figures) -> bool:
        self.checks.append({"check": what, "ok": bool(ok), "detail": detail, **figures})
        self.log(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
        return bool(ok)

    def skip(self, reason: str) -> None:
        self.status, self.reason = "SKIP", reason

    def fail(self, reason: str) -> None:
        self.status, self.reason = "FAIL", reason

    def verdict(self) -> tuple[str, str]:
        if self.status is not None:
            return self.status, self.reason
        failed = [c["check"] for c in self.checks if not c["ok"]]
        if failed:
            return "FAIL", f"{len(failed)} of {len(self.checks)} checks failed: " + "; ".join(failed[:5])
        if not self.checks:
            return "FAIL", "no check ran"
        return "PASS", ""

    def as_dict(self) -> dict:
        status, reason = self.verdict()
        return {"part": self.name, "status": status, "reason": reason, "seconds": round(time.monotonic() - self.t0, 1),
                "figures": self.figures, "checks": self.checks}

    def finish(self) -> int:
        out = self.as_dict()
        if self.report:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            self.report.write_text(json.dumps(out, indent=1, default=str) + "\n")
        figures = ", ".join(f"{k}={v}" for k, v in self.figures.items() if not isinstance(v, (dict, list)))
        print(f"== {self.name}: {out['status']}" + (f" -- {out['reason']}" if out["reason"] else "")
              + (f" [{figures}]" if figures else ""), flush=True)
        return 0 if out["status"] in ("PASS", "SKIP") else 1

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self.fail(f"{kind.__name__}: {exc}")
            self.figures["traceback"] = "".join(traceback.format_exception(kind, exc, tb))[-4000:]
            print(self.figures["traceback"], file=sys.stderr, flush=True)
            return True
        return False
