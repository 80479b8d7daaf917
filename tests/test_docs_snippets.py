"""The README's and docs/' code blocks that a user pastes, run as written against real servers.

A fenced block whose info string carries `snippet` (```` ```bash snippet ```` or ```` ```python snippet ````,
optionally `expect=REGEX`) is run: bash with `bash -euo pipefail`, Python with the environment's
interpreter, from a folder outside the checkout, with the environment active as a user's shell has
it (PATH and VIRTUAL_ENV; no PYTHONPATH, so `client` comes from the installed package). The ports
the docs use are those of `make serve` (and of the disaggregated page's two servers); each is
replaced by the port of the test server that plays that part. A snippet passes when it exits 0,
prints something on stdout, matches its `expect`, and prints no traceback.

A block marked `serve` (`make serve ...`, `qwen3vl-serve ...`: they run until stopped) is checked
without starting it: `make -n` expands it and the launcher's own parser must accept the command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, SERVER_SETTINGS

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]+)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
URL = re.compile(r"\b(?:127\.0\.0\.1|localhost):(\d{2,5})\b")
# the ports the docs use -> (the server that plays the part, which of its ports)
DOC_PORTS = {8000: ("all", "http"), 8001: ("all", "grpc"), 8002: ("all", "metrics"), 9000: ("openai", "http"),
             8100: ("encoder", "http"), 8101: ("encoder", "grpc"), 8102: ("encoder", "metrics"),
             8200: ("language", "http"), 8201: ("language", "grpc"), 8202: ("language", "metrics")}
SNIPPET_TIMEOUT = 180


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    lang: str
    kind: str  # "snippet" (run) or "serve" (checked with make -n and the launcher's parser)
    expect: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def doc_ports(self) -> set[int]:
        return {int(p) for p in URL.findall(self.code)}

    @property
    def servers(self) -> set[str]:
        return {DOC_PORTS[p][0] for p in self.doc_ports if p in DOC_PORTS}


def extract(text: str, path: Path = ROOT / "README.md") -> list[Snippet]:
    """The marked blocks of one Markdown text, in order."""
    found = []
    for m in FENCE.finditer(text):
        words = m.group(2).split()
        kind = next((w for w in words if w in ("snippet", "serve")), None)
        if kind is None:
            continue
        expect = next((w.removeprefix("expect=") for w in words if w.startswith("expect=")), None)
        found.append(Snippet(path, text.count("\n", 0, m.start()) + 1, m.group(1), kind, expect, m.group(3)))
    return found


def all_snippets(kind: str) -> list[Snippet]:
    return [s for path in DOCS for s in extract(path.read_text(encoding="utf-8"), path) if s.kind == kind]


def substitute(code: str, ports: dict[int, int]) -> str:
    """The code with each documented port replaced by the test's; a port the table does not know
    is an error (a snippet must not reach something the test did not start)."""
    def one(m):
        port = int(m.group(1))
        if port not in ports:
            raise ValueError(f"port {port} in a snippet is not one of the documented ports {sorted(DOC_PORTS)}")
        return m.group(0).replace(m.group(1), str(ports[port]))
    return URL.sub(one, code)


def user_env(admin_key: str | None = None) -> dict[str, str]:
    """A shell with the checkout's environment activated (`. .venv/bin/activate`), nothing else."""
    venv = Path(sys.prefix)
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV": str(venv),
           "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if admin_key:
        env["QWEN3VL_ADMIN_KEY"] = admin_key
    return env


def run(snippet: Snippet, ports: dict[int, int], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = substitute(snippet.code, ports)
    if snippet.lang in ("bash", "sh", "shell"):
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    elif snippet.lang == "python":
        cmd = [str(Path(sys.prefix) / "bin" / "python"), "-c", code]
    else:
        raise ValueError(f"{snippet.id}: no runner for {snippet.lang!r} blocks")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT)


def problems(snippet: Snippet, result: subprocess.CompletedProcess) -> list[str]:
    """What is wrong with a snippet's run (empty: it did what it shows)."""
    found = []
    if result.returncode != 0:
        found.append(f"exit status {result.returncode}")
    if not result.stdout.strip():
        found.append("nothing on stdout")
    if snippet.expect and not re.search(snippet.expect, result.stdout):
        found.append(f"stdout does not match {snippet.expect!r}")
    if "Traceback" in result.stderr:
        found.append("a traceback on stderr")
    return found


# -- the servers the snippets talk to --------------------------------------------------------------
@pytest.fixture(scope="module")
def openai_api(server, tmp_path_factory):
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.serve.server import OpenAIServer, free_ports

    srv = OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], Settings(**SERVER_SETTINGS),
                       log_file=tmp_path_factory.mktemp("openai-docs") / "openai.log").start()
    yield srv
    srv.stop()


def ports_for(snippet: Snippet, request) -> dict[int, int]:
    """Documented port -> the port of the test server that plays its part (started on demand)."""
    fixture = {"all": "server", "openai": "openai_api", "encoder": "encoder_server", "language": "language_server"}
    ports = {}
    for doc_port, (role, which) in DOC_PORTS.items():
        if role not in snippet.servers:
            continue
        srv = request.getfixturevalue(fixture[role])
        ports[doc_port] = srv.port if role == "openai" else getattr(srv.ports, which)
    return ports


# -- the snippets ----------------------------------------------------------------------------------
SNIPPETS = all_snippets("snippet")
SERVE = all_snippets("serve")


def test_the_docs_mark_their_snippets():
    """The quick start's queries (gRPC, HTTP, OpenAI) and the disaggregated client lines are marked, so
    removing a marker cannot quietly drop a block from the tests."""
    readme = [s for s in SNIPPETS if s.path.name == "README.md"]
    assert {8001, 8000, 9000} <= set().union(*(s.doc_ports for s in readme))
    assert len(readme) >= 5
    disagg = [s for s in SNIPPETS if s.path.name == "disaggregated.md"]
    assert {"encoder", "language"} <= set().union(*(s.servers for s in disagg))
    assert any("shm" in s.code for s in disagg)
    assert any(s.path.name == "README.md" and "make serve" in s.code for s in SERVE)


@pytest.mark.server
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs_as_written(snippet, request, tmp_path):
    ports = ports_for(snippet, request)
    key = request.getfixturevalue("server").admin_key  # every test server has the session's key
    result = run(snippet, ports, tmp_path, user_env(key))
    found = problems(snippet, result)
    assert not found, (f"{snippet.id}: {'; '.join(found)}\n--- code (ports {ports}) ---\n{snippet.code}"
                       f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")


def serve_commands(snippet: Snippet) -> list[str]:
    """The `make serve` and `qwen3vl-serve` command lines of a block (continuations joined)."""
    lines = snippet.code.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split(" #", 1)[0].strip().removesuffix("&").strip()
        if line.startswith(("make serve", "qwen3vl-serve")):
            commands.append(line)
    return commands


def launcher_argv(command: str) -> list[str]:
    """The qwen3vl-serve arguments a command line runs (`make serve` expanded by `make -n`)."""
    if command.startswith("qwen3vl-serve"):
        return shlex.split(command)[1:]
    out = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"{command}: {out.stderr}"
    line = next((x for x in out.stdout.replace("\\\n", " ").splitlines() if "/qwen3vl-serve " in x), None)
    assert line is not None, f"{command} runs no qwen3vl-serve:\n{out.stdout}"
    return shlex.split(line.split("/qwen3vl-serve ", 1)[1])


@pytest.mark.parametrize("snippet", SERVE, ids=[s.id for s in SERVE])
def test_serve_block_is_a_command_the_launcher_takes(snippet, capsys):
    from qwen3vl_triton.serve.launcher import parse_args

    commands = serve_commands(snippet)
    assert commands, f"{snippet.id}: a serve block without a make serve or qwen3vl-serve line"
    for command in commands:
        argv = launcher_argv(command)
        try:
            args = parse_args(argv)
        except SystemExit:
            pytest.fail(f"{snippet.id}: qwen3vl-serve refuses {argv}: {capsys.readouterr().err}")
        for port in URL.findall(command) + re.findall(r"_PORT=(\d+)", command):
            assert int(port) in DOC_PORTS, f"{snippet.id}: port {port} is not one the snippets are tested on"
        if "TOPOLOGY=" in command:
            assert args.topology == re.search(r"TOPOLOGY=(\w+)", command).group(1)


# -- the runner itself fails a broken snippet ------------------------------------------------------
BROKEN = """
Text around the blocks is ignored, and so is a block without the marker:

```bash
exit 3
```

```bash snippet
python -m client generate --url 127.0.0.1:8001 --prompt "Hello." --max-tokenz 8
```

```python snippet expect=never-printed
print("something else")
```

```bash snippet
curl -fsS http://127.0.0.1:8000/v2/models/no_such_model/generate_stream -d '{"text_input": "x"}'
```
"""


@pytest.mark.server
def test_a_broken_snippet_fails(server, tmp_path):
    snippets = extract(BROKEN)
    assert [(s.lang, s.kind, s.expect) for s in snippets] == [("bash", "snippet", None),
                                                              ("python", "snippet", "never-printed"),
                                                              ("bash", "snippet", None)]
    ports = {8000: server.ports.http, 8001: server.ports.grpc}
    results = [run(s, ports, tmp_path, user_env()) for s in snippets]
    misspelled, unexpected, no_model = (problems(s, r) for s, r in zip(snippets, results))
    assert "exit status 2" in misspelled and "--max-tokenz" in results[0].stderr  # argparse: unrecognized
    assert unexpected == ["stdout does not match 'never-printed'"]
    assert "exit status 22" in no_model  # curl -f: the HTTP error is the exit status
    with pytest.raises(ValueError, match="port 8765 in a snippet is not one of the documented ports"):
        substitute("curl http://127.0.0.1:8765/", ports)


def test_a_serve_line_the_launcher_refuses_fails():
    from qwen3vl_triton.serve.launcher import parse_args

    assert launcher_argv("make serve TOPOLOGY=language GRPC_PORT=8201")[:2] == ["--topology", "language"]
    for command in ("make serve TOPOLOGY=singel", 'make serve ARGS="--open-ai-port 9000"'):
        with pytest.raises(SystemExit):
            parse_args(launcher_argv(command))


# -- references between documents ----------------------------------------------------------------
def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / p for p in out.stdout.splitlines()]
    return [f for f in files if f.is_file() and f.suffix not in (".png", ".gguf", ".safetensors")]


def test_every_design_reference_names_a_section_that_exists():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"(?m)^## (\d+)\. ", design)}
    cited = {}
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"\bDESIGN (?:§|section)", text), f"{path}: cites DESIGN, a file the repository lacks"
        for first, last in re.findall(r"design\.md §(\d+)(?:-(\d+))?", text):
            for n in (first, last or first):
                cited.setdefault(int(n), []).append(str(path.relative_to(ROOT)))
    assert cited, "nothing cites docs/design.md"
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert not missing, f"cited sections that docs/design.md lacks: {missing}"


def test_relative_links_in_the_docs_point_to_files_that_exist():
    broken = []
    for path in [*DOCS, ROOT / "load_tests" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_topology_is_defined_in_the_help_the_readme_and_the_design():
    from qwen3vl_triton.serve import launcher
    from qwen3vl_triton.serve.repository import TOPOLOGIES

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for name, models in TOPOLOGIES.items():
        assert re.search(rf"(?m)^  {name} +\S", launcher.__doc__), f"--help does not define {name}"
        assert re.search(rf"(?m)^\| `{name}`", readme), f"the README's topology table lacks {name}"
        row = re.search(rf"(?m)^\| `{name}`[^|]*\|([^|]*)\|", design)
        assert row, f"docs/design.md's topology table lacks {name}"
        named = set(re.findall(r"`(\w+)`", row.group(1)))
        assert named - {"language_url"} <= set(models), (name, named)  # language_url: the setting
