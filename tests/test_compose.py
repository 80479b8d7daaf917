"""docker-compose.yml: valid for a real Compose implementation (docker-compose 1.29 validates offline,
without a Docker engine), and consistent with the repository: images pinned as builders/trtllm/README.md
says, every file, command, flag and port it names exists and agrees, GPUs reserved only where used."""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
GPU_PIN = re.compile(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-trtllm-python-py3")
READY = "/v2/health/ready"
SERVICES = {"engine-build", "triton", "encoder", "language", "triton-cpu", "locust", "locust-disagg", "locust-cpu",
            "triton-http", "encoder-http", "triton-cpu-http"}
FRONTS = {"triton": "triton-http", "encoder": "encoder-http", "triton-cpu": "triton-cpu-http"}  # nginx before HTTP
NGINX_TEMPLATE = ROOT / "docker" / "nginx" / "triton-http.conf.template"
PROFILES = ("build", "cpu", "loadtest", "loadtest-disagg", "loadtest-cpu")
PLUGIN_FILE = "libqwen3vl_deepstack_plugin.so"


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with the defaults (the file must work with no variable set)."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))  # safe_load resolves anchors and << merges


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def argv_of(service: dict) -> list[list[str]]:
    """The command lines a service runs (a bash -c script gives one per line)."""
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, list) and cmd[:2] in (["bash", "-ec"], ["bash", "-c"], ["sh", "-c"]):
        script = cmd[2].replace("\\\n", " ")
        return [shlex.split(line) for line in script.splitlines() if line.strip()]
    return [cmd if isinstance(cmd, list) else shlex.split(cmd)]


def option(argv: list[str], name: str, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def serve_argv(service: dict) -> list[str] | None:
    for argv in argv_of(service):
        if argv and argv[0] == "qwen3vl-serve":
            return argv
    return None


def module_argv(service: dict, module: str) -> list[str] | None:
    for argv in argv_of(service):
        if argv[:3] in (["python3", "-m", module], ["python", "-m", module]):
            return argv
    return None


# -- a real Compose implementation -----------------------------------------------------------------------
def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None and shutil.which("make"):  # the same idempotent install step as `make test` (root + apt-get)
        subprocess.run(["make", "-s", "tools"], cwd=ROOT, capture_output=True, timeout=900)
        exe = shutil.which("docker-compose")
    if exe is None:
        reason = ("docker-compose is not installed and could not be installed (`make tools` needs root and "
                  "apt-get: apt-get install docker-compose)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


def run_compose(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN3VL_", "COMPOSE_"))}
    env.pop("USERS", None)
    env.pop("DURATION", None)
    return subprocess.run([docker_compose(), "-f", str(COMPOSE), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_docker_compose_config_is_valid():
    out = run_compose("config", "-q")
    assert out.returncode == 0, out.stderr


def test_every_service_is_reachable_through_its_profile():
    out = run_compose(*(a for p in PROFILES for a in ("--profile", p)), "config", "--services")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == SERVICES
    default = run_compose("config", "--services")
    assert set(default.stdout.split()) >= {"triton", "encoder", "language"}


# -- the file itself ---------------------------------------------------------------------------------------
def test_no_top_level_name_key(compose):
    assert "name" not in compose  # docker-compose 1.29 rejects it


def test_profiles(services):
    assert services["engine-build"]["profiles"] == ["build"]
    assert "loadtest" in services["locust"]["profiles"]
    assert "loadtest-disagg" in services["locust-disagg"]["profiles"]
    assert "cpu" in services["triton-cpu"]["profiles"]
    for name in ("triton", "encoder", "language"):
        assert "profiles" not in services[name]  # the GPU stack is the default
    for server, front in FRONTS.items():
        assert services[front].get("profiles") == services[server].get("profiles"), front


def test_images_are_pinned_as_the_trtllm_readme_says(services):
    readme = (ROOT / "builders" / "trtllm" / "README.md").read_text()
    pins = set(GPU_PIN.findall(readme))
    assert len(pins) == 1, f"builders/trtllm/README.md should pin exactly one trtllm image, found {pins}"
    (yymm,) = pins
    gpu_image = f"nvcr.io/nvidia/tritonserver:{yymm}-trtllm-python-py3"
    cpu_image = f"nvcr.io/nvidia/tritonserver:{yymm}-py3"
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG BASE_IMAGE={gpu_image}" in dockerfile
    for name, svc in services.items():
        if name in FRONTS.values():  # nginx's own image (test_http_fronts_are_nginx_with_the_bounds)
            continue
        args = svc["build"]["args"]
        gpu = "deploy" in svc
        assert args["BASE_IMAGE"] == (gpu_image if gpu else cpu_image), name
        assert svc["build"]["dockerfile"] == "docker/Dockerfile" and svc["build"]["context"] == "."
        if gpu:
            assert not args.get("TORCH_INDEX"), f"{name}: the trtllm image keeps its own CUDA torch"
        else:
            assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu", name


def test_cpu_image_installs_the_pinned_cpu_torch_first():
    dockerfile = DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert f"ARG TORCH={torch_pin}" in dockerfile
    first = dockerfile.index('--index-url "${TORCH_INDEX}" "${TORCH}"')
    assert first < dockerfile.index("-r /tmp/requirements.txt")
    assert "pip install --no-deps -e ." in dockerfile


def test_the_cpu_image_builds_the_ggml_runner_for_every_cpu_never_the_build_hosts(services):
    from builders.llamacpp import build

    dockerfile = DOCKERFILE.read_text()
    assert "ARG GGML_RUNNER=0" in dockerfile
    assert "python3 builders/llamacpp/build.py --python-package --portable" in dockerfile
    built = {name: svc for name, svc in services.items() if "build" in svc}  # the project's images (not nginx)
    assert {"deploy" in svc for svc in built.values()} == {True, False}  # GPU and CPU services both checked
    for name, svc in built.items():  # the CPU image builds it, the GPU image (TensorRT-LLM) does not
        assert svc["build"]["args"].get("GGML_RUNNER", "0") == ("0" if "deploy" in svc else "1"), name
    portable = build.python_cmake_args(portable=True)
    assert "-DGGML_NATIVE=OFF" in portable and "-DGGML_BACKEND_DL=ON" in portable
    assert "-DGGML_CPU_ALL_VARIANTS=ON" in portable
    assert "-DGGML_NATIVE=ON" in build.python_cmake_args()  # the host's own build (make venv)


def test_dockerfile_copies_files_that_exist():
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY . "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).is_file(), f"docker/Dockerfile copies {src}, which is not in the repository"


def test_gpus_are_reserved_exactly_where_the_gpu_is_used(services):
    for name, svc in services.items():
        argv = serve_argv(svc)
        wants_gpu = name == "engine-build" or (argv is not None and option(argv, "--device") == "gpu")
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert bool(devices) == wants_gpu, name
        for d in devices:
            assert "gpu" in d["capabilities"] and d["driver"] == "nvidia"


# -- servers: commands, flags, ports, healthchecks -------------------------------------------------------
def server_services(services):
    return {name: svc for name, svc in services.items() if serve_argv(svc) is not None}


def test_qwen3vl_serve_is_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qwen3vl-serve"] == "qwen3vl_triton.serve.launcher:main"


def test_servers_are_the_expected_topologies(services):
    topologies = {name: option(serve_argv(svc), "--topology") for name, svc in server_services(services).items()}
    assert topologies == {"triton": "single", "encoder": "encoder", "language": "language", "triton-cpu": "all"}
    for name, svc in server_services(services).items():
        argv = serve_argv(svc)
        assert option(argv, "--address") == "0.0.0.0", name  # reachable from other containers
        assert option(argv, "--device") == ("cpu" if name == "triton-cpu" else "gpu")


@pytest.mark.parametrize("name", ["triton", "encoder", "language", "triton-cpu"])
def test_qwen3vl_serve_accepts_every_flag_and_setting(name, services):
    from qwen3vl_triton.serve.launcher import parse_args, settings_from

    argv = serve_argv(services[name])
    args = parse_args(argv[1:])  # SystemExit on an unknown flag or a bad choice
    settings_from(args.set)  # SystemExit on an unknown --set key
    if args.device == "gpu":
        assert args.engine_dir == "/engines/qwen3vl", f"{name}: GPU serving renders from the built engine"


def test_encoder_sends_tables_to_the_language_service(services):
    from qwen3vl_triton.serve.launcher import parse_args, settings_from

    encoder = parse_args(serve_argv(services["encoder"])[1:])
    language = serve_argv(services["language"])
    assert settings_from(encoder.set).language_url == f"language:{option(language, '--grpc-port')}"
    assert services["encoder"]["depends_on"]["language"] == {"condition": "service_healthy"}


def test_ports_healthchecks_and_published_ports_agree(services):
    published = {}
    for name, svc in server_services(services).items():
        argv = serve_argv(svc)
        http, grpc, metrics = (int(option(argv, f"--{p}-port")) for p in ("http", "grpc", "metrics"))
        probe = " ".join(svc["healthcheck"]["test"])
        assert f":{http}{READY}" in probe, f"{name}: the healthcheck must ask {READY} on the HTTP port {http}"
        if name == "language":
            assert "ports" not in svc, "the language server is reached on the compose network only"
            continue
        openai = option(argv, "--openai-port")
        targets = {}
        front = services[FRONTS[name]]  # the HTTP port is published through nginx
        assert front["environment"]["QWEN3VL_TRITON"] == f"{name}:{http}", name
        for mapping in svc["ports"] + [m.rsplit(":", 1)[0] + f":{http}" for m in front["ports"]]:
            address, host, container = str(mapping).split(":")
            assert address == "127.0.0.1", f"{name}: {mapping} must listen on the host's loopback by default"
            host, container = int(host), int(container)
            assert host not in published, f"host port {host} published by {published.get(host)} and {name}"
            published[host] = name
            targets[container] = host
        assert set(targets) == {http, grpc, metrics} | ({int(openai)} if openai else set()), name
    assert published[8000] == "triton" and published[8001] == "triton"


def test_http_fronts_are_nginx_with_the_bounds(services):
    """Triton 2.51 reads an HTTP body whole (no size flag, no read timeouts): nginx caps it in front,
    at the servers' max_request_bytes, and each server depends on its front (`up -d triton` starts both)."""
    from qwen3vl_triton.serve.repository import Settings

    template = NGINX_TEMPLATE.read_text()
    variables = set(re.findall(r"\$\{(QWEN3VL_[A-Z_]+)\}", template))
    assert variables == {"QWEN3VL_TRITON", "QWEN3VL_MAX_BODY"}
    for line in ("client_max_body_size ${QWEN3VL_MAX_BODY};", "client_header_timeout", "client_body_timeout",
                 "limit_conn per_client", "proxy_buffering off;", "listen 8000;"):
        assert line in template, line
    for server, name in FRONTS.items():
        svc = services[name]
        assert re.fullmatch(r"nginxinc/nginx-unprivileged:\d+\.\d+\.\d+-alpine", svc["image"]), svc["image"]
        assert "build" not in svc and set(svc["environment"]) == variables, name
        assert svc["volumes"] == [f"./{NGINX_TEMPLATE.relative_to(ROOT)}:/etc/nginx/templates/default.conf.template:ro"]
        size = svc["environment"]["QWEN3VL_MAX_BODY"]
        assert size == f"{Settings().max_request_bytes // 2**20}m", f"{name}: the body bound is max_request_bytes"
        assert services[server]["depends_on"][name] == {"condition": "service_healthy"}
        assert "8000/nginx-health" in " ".join(svc["healthcheck"]["test"])


def test_published_ports_open_to_other_hosts_only_when_asked():
    text = COMPOSE.read_text()
    mappings = re.findall(r"^\s*- (\S+:\d+:\d+)$", text, re.M)
    assert mappings and all(m.startswith("${QWEN3VL_PUBLISH_ADDRESS:-127.0.0.1}:") for m in mappings), mappings


def test_servers_get_the_admin_key_from_the_environment(services):
    for name, svc in server_services(services).items():
        assert svc["environment"] == {"QWEN3VL_ADMIN_KEY": ""}, name  # empty: each server generates its own


def test_services_run_as_the_images_unprivileged_user(services):
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.M)
    assert users and users[-1] not in ("root", "0"), "the image's last USER is its runtime user"
    for name, svc in services.items():
        assert svc.get("user") in (None, users[-1]), f"{name} runs as {svc.get('user')}"


def test_healthcheck_gives_loading_time(services):
    for name, svc in server_services(services).items():
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["test"][1] == "python3"
        assert "start_period" in hc and hc["retries"] >= 1, name


def test_depends_on_waits_for_a_healthy_service(services):
    seen = 0
    for name, svc in services.items():
        for target, cond in (svc.get("depends_on") or {}).items():
            seen += 1
            assert cond == {"condition": "service_healthy"}, name
            assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
    assert seen >= 2


@pytest.mark.parametrize("name, target, model", [("locust", "triton", "qwen3vl"),
                                                 ("locust-disagg", "encoder", "qwen3vl_disagg"),
                                                 ("locust-cpu", "triton-cpu", "qwen3vl")])
def test_locust_points_at_its_server(name, target, model, services):
    from load_tests.run import parse_args

    svc = services[name]
    argv = module_argv(svc, "load_tests.run")
    assert argv is not None and importlib.util.find_spec("load_tests.run") is not None
    args = parse_args(argv[3:])  # every flag exists
    server = serve_argv(services[target])
    assert args.url == f"{target}:{option(server, '--http-port')}"
    assert args.grpc_url == f"{target}:{option(server, '--grpc-port')}"
    assert args.model == model
    assert list(svc["depends_on"]) == [target]
    assert args.checkpoint == "/models/checkpoint"
    assert any(v.endswith(":/models/checkpoint:ro") for v in svc["volumes"])
    assert any(v.startswith("./load_tests/reports:") for v in svc["volumes"])
    assert (ROOT / "load_tests" / "locustfile.py").is_file()


# -- the engine build ------------------------------------------------------------------------------------
def test_engine_build_runs_the_builders_with_flags_they_have(services):
    from qwen3vl_triton.serve.launcher import DEFAULT_PLUGIN

    lines = argv_of(services["engine-build"])
    scripts = [argv for argv in lines if argv[:1] == ["python3"]]
    assert [argv[1] for argv in scripts] == ["builders/trtllm/convert_checkpoint.py", "builders/trtllm/build_engine.py"]
    for argv in scripts:
        source = (ROOT / argv[1]).read_text()
        for flag in (a for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{argv[1]} has no {flag} option"
    convert, build = scripts
    assert option(build, "--checkpoint") == option(convert, "--output")
    assert option(build, "--plugin-library") == DEFAULT_PLUGIN
    assert option(build, "--deepstack-impl") == "plugin"

    cmake = [argv for argv in lines if argv[:1] == ["cmake"]]
    assert (ROOT / option(cmake[0], "-S") / "CMakeLists.txt").is_file()
    prefix = option(cmake[-1], "--prefix")
    cmakelists = (ROOT / "builders" / "plugin" / "CMakeLists.txt").read_text()
    assert "LIBRARY DESTINATION lib" in cmakelists and "qwen3vl_deepstack_plugin SHARED" in cmakelists
    assert f"{prefix}/lib/{PLUGIN_FILE}" == DEFAULT_PLUGIN  # where cmake --install puts it = the launcher's default


def test_gpu_servers_mount_the_built_plugin_and_engine(services):
    from qwen3vl_triton.serve.launcher import DEFAULT_PLUGIN

    build = services["engine-build"]
    build_argv = [a for a in argv_of(build) if a[1:2] == ["builders/trtllm/build_engine.py"]][0]
    engine_dir = option(build_argv, "--output")
    volume_of = {v.split(":")[1]: v.split(":")[0] for v in build["volumes"]}
    plugin_prefix = str(Path(DEFAULT_PLUGIN).parent.parent)
    for name in ("triton", "encoder", "language"):
        svc = services[name]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts.get(plugin_prefix) == volume_of[plugin_prefix], f"{name} lacks the plugin volume"
        assert option(serve_argv(svc), "--engine-dir") == engine_dir
        assert mounts.get("/engines") == volume_of["/engines"]
    assert set(build["volumes"]) >= {"engines:/engines", "plugin:/opt/qwen3vl"}
