"""Deployment artefacts checked with the real tools: systemd-analyze, the install script run as
root into a temporary prefix, kubectl kustomize + kubernetes-validate, and the Dockerfile's rules.

In CI (CI=true) a missing tool is a failure, not a skip (conftest.require_tool)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import IN_CI, require_tool

from tests.layout import PACKAGE_FOLDERS, PACKAGED_FOLDERS

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "gpuphase.service"
INSTALL_SH = PACKAGING / "install.sh"


def _run(*argv, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _unit_directives(text: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order (systemd allows repeated keys, so configparser cannot)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


# --- systemd ----------------------------------------------------------------------------------------


def _verify(unit_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify; warnings (unknown keys, bad values) go to stderr with exit code 0,
    so a clean verify means exit 0 AND no output."""
    return _run(require_tool("systemd-analyze"), "verify", "--man=no", unit_path, check=False)


@pytest.fixture
def unit_with_executable(tmp_path):
    """The shipped unit with ExecStart pointing at an executable that exists (verify checks that)."""
    executable = tmp_path / "bin" / "gpuphase"
    executable.parent.mkdir()
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    text = UNIT.read_text().replace("/opt/gpuphase/venv/bin/gpuphase", str(executable))
    assert str(executable) in text
    unit = tmp_path / "gpuphase.service"
    unit.write_text(text)
    return unit


def test_unit_verifies_cleanly(unit_with_executable):
    result = _verify(unit_with_executable)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda t: t.replace("ProtectSystem=strict", "ProtectSystm=strict"), "Unknown key"),
        (lambda t: t.replace("Type=notify", "Type=notifyy"), "Failed to parse service type"),
        (lambda t: re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/gpuphase", t), "is not executable"),
    ],
)
def test_verify_catches_a_broken_copy(unit_with_executable, tmp_path, breakage, complaint):
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    broken = broken_dir / "gpuphase.service"
    broken.write_text(breakage(unit_with_executable.read_text()))
    result = _verify(broken)
    assert complaint in result.stdout + result.stderr


def test_unit_runs_unprivileged_hardened_and_notifies():
    d = _unit_directives(UNIT.read_text())
    expected = {
        "Service.Type": ["notify"], "Service.NotifyAccess": ["main"], "Service.User": ["gpuphase"],
        "Service.SupplementaryGroups": ["video"], "Service.NoNewPrivileges": ["yes"],
        "Service.CapabilityBoundingSet": [""], "Service.ProtectSystem": ["strict"],
        "Service.ProtectHome": ["yes"], "Service.PrivateTmp": ["yes"], "Service.Restart": ["on-failure"],
        "Service.EnvironmentFile": ["-/etc/default/gpuphase"],
        "Service.ExecStart": ["/opt/gpuphase/venv/bin/gpuphase run $GPUPHASE_ARGS"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
    }
    assert {key: d.get(key) for key in expected} == expected
    # The GPU must stay reachable: no private /dev, and the NVIDIA device nodes allowed.
    assert "Service.PrivateDevices" not in d
    assert "char-nvidia* rw" in d["Service.DeviceAllow"]
    # The agent pings WATCHDOG=1 from every sampling tick (agent/app.py).
    assert d["Service.WatchdogSec"] == ["30s"]
    for limit in ("Service.MemoryMax", "Service.CPUQuota"):
        assert limit in d


def test_default_file_names_only_real_settings():
    """Every GPUPHASE_* variable in the shipped /etc/default file is one the agent reads."""
    from gpuphase.agent.config import OPTIONS

    known = {option.env for option in OPTIONS} | {"GPUPHASE_ARGS", "GPUPHASE_CONFIG"}
    text = (PACKAGING / "systemd" / "gpuphase.default").read_text()
    named = set(re.findall(r"^#?(GPUPHASE_[A-Z_]+)=", text, flags=re.M))
    assert named and named <= known, named - known


# --- install.sh ---------------------------------------------------------------------------------------


@pytest.fixture
def source_copy(tmp_path):
    """The distribution's sources copied out, so the build's build/ and *.egg-info stay out of the repo."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    (source / "README.md").touch()
    for folder in PACKAGED_FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def _require_offline_build() -> None:
    """pip builds the sdist with --no-build-isolation, i.e. with the installed setuptools, which
    needs bdist_wheel (the `wheel` package, or setuptools >= 70.1)."""
    import setuptools

    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (77, 0):
        message = f"building offline needs setuptools >= 77 (pyproject's SPDX license), not {setuptools.__version__}"
        pytest.fail(message) if IN_CI else pytest.skip(message)


def test_install_script_into_a_temporary_prefix(tmp_path, source_copy):
    if os.geteuid() != 0:
        message = "install.sh must run as root (it creates a system user)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    _require_offline_build()
    create_user = shutil.which("useradd") is not None
    user = f"gpuphase-t{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PREFIX": str(tmp_path / "opt"), "SYSTEMD_DIR": str(tmp_path / "systemd"),
        "ETC_DIR": str(tmp_path / "etc"), "GPUPHASE_USER": user,
        # No network: the new venv sees the test interpreter's packages (its dependencies, pip,
        # setuptools and wheel for the offline build) through PYTHONPATH, not through the system
        # Python's site-packages, which need not have them.
        "VENV_ARGS": "--without-pip",
        "PIP_ARGS": "--no-deps --no-build-isolation --no-index",
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(sysconfig.get_path(p) for p in ("purelib", "platlib"))),
    }
    user_flags = [] if create_user else ["--no-user"]
    try:
        out = _run("bash", INSTALL_SH, "--source", source_copy, "--no-systemctl", *user_flags, env=env).stdout
        assert "systemctl not run" in out
        gpuphase = tmp_path / "opt" / "venv" / "bin" / "gpuphase"
        assert "run" in _run(gpuphase, "--help", env=env).stdout
        if create_user:
            assert _run("id", "-u", user).returncode == 0

        unit = tmp_path / "systemd" / "gpuphase.service"
        defaults = tmp_path / "etc" / "default" / "gpuphase"
        d = _unit_directives(unit.read_text())
        assert d["Service.ExecStart"] == [f"{gpuphase} run $GPUPHASE_ARGS"]
        assert d["Service.User"] == [user] and d["Service.Group"] == [user]
        # The settings file the unit reads is the one install.sh wrote (ETC_DIR), not /etc's.
        assert d["Service.EnvironmentFile"] == [f"-{defaults}"]
        rest = unit.read_text().replace(str(defaults), "").replace(str(tmp_path / "opt"), "")
        assert "/etc/default/gpuphase" not in rest and "/opt/gpuphase" not in rest  # comments included
        result = _verify(unit)  # the installed unit, with its real executable
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

        assert defaults.read_text() == (PACKAGING / "systemd" / "gpuphase.default").read_text()
        defaults.write_text("GPUPHASE_LOG_LEVEL=debug\n")
        again = _run("bash", INSTALL_SH, "--source", source_copy, "--no-systemctl", *user_flags, env=env).stdout
        assert "kept existing" in again and (create_user is False or "exists" in again)
        assert defaults.read_text() == "GPUPHASE_LOG_LEVEL=debug\n"  # the admin's settings survive

        _run("bash", INSTALL_SH, "--uninstall", "--no-systemctl", env=env)
        assert not unit.exists() and not (tmp_path / "opt").exists() and defaults.exists()
    finally:
        purge = _run("bash", INSTALL_SH, "--uninstall", "--purge", "--no-systemctl", env=env, check=False)
    assert purge.returncode == 0, purge.stderr
    assert not (tmp_path / "etc" / "default" / "gpuphase").exists()
    assert subprocess.run(["id", "-u", user], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from a copy of the sources (offline, with this interpreter's setuptools)."""
    _require_offline_build()
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    for folder in PACKAGED_FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", work / "dist", source)
    (wheel,) = (work / "dist").glob("gpuphase-*.whl")
    return wheel


def _wheel_names(wheel: Path) -> set[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_installs_one_top_level_package(built_wheel):
    names = _wheel_names(built_wheel)
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"gpuphase"}
    (top_level_txt,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level_txt:
        import zipfile

        with zipfile.ZipFile(built_wheel) as archive:
            assert archive.read(top_level_txt).decode().split() == ["gpuphase"]


def test_wheel_holds_every_module_and_the_data_read_at_run_time(built_wheel):
    names = _wheel_names(built_wheel)
    expected = set()
    for package, folder in PACKAGE_FOLDERS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            expected.add("/".join((*package.split("."), *path.relative_to(base).parts)))
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel (add their package to pyproject): {missing}"
    data = {"gpuphase/model/metrics.yaml", "gpuphase/alerts/gpuphase-rules.yaml", "gpuphase/alerts/alertmanager.yml",
            *(f"gpuphase/dashboards/{p.name}" for p in (ROOT / "dashboards").glob("*.json"))}
    assert data <= names, sorted(data - names)


def test_the_installed_wheel_runs_without_the_repository(built_wheel, tmp_path):
    """Installed on its own (no editable finder, no repository on sys.path), the agent and the demo
    start, and every module comes from the installed package."""
    target = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, built_wheel)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), *dict.fromkeys(sysconfig.get_path(p) for p in ("purelib", "platlib"))]), "PYTHONNOUSERSITE": "1"}
    probe = ("import sys, gpuphase.agent.app, gpuphase.demo.run, gpuphase.exporters.registry, gpuphase.alerts.rules, "
             "gpuphase.dashboards.build, gpuphase.model.metricdefs as m; "
             "assert m.load(); "
             "bad = [n for n, mod in sys.modules.items() if n.startswith('gpuphase') and getattr(mod, '__file__', None) "
             f"and not mod.__file__.startswith({str(target)!r})]; "
             "assert not bad, bad; "
             "assert not any(n.split('.')[0] in ('agent', 'exporters', 'alerts', 'dashboards') for n in sys.modules)")
    _run(sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {env['PYTHONPATH'].split(os.pathsep)!r}; {probe}",
         cwd=tmp_path)
    ports = ["--web.listen-address", "127.0.0.1:0", "--otlp.grpc-listen-address", "127.0.0.1:0",
             "--otlp.http-listen-address", ""]
    demo = _run(sys.executable, "-m", "gpuphase", "demo", "--demo.duration", "2", *ports, env=env, cwd=tmp_path)
    assert "gpuphase demo: scenario" in demo.stdout
    run = subprocess.Popen([sys.executable, "-m", "gpuphase", "run", "--backend", "sim", *ports], env=env,
                           cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while "ready:" not in seen and time.monotonic() < deadline and run.poll() is None:
            seen += run.stderr.readline()
        assert run.poll() is None and "ready:" in seen, seen
    finally:
        run.terminate()
        run.wait(timeout=30)


def test_install_script_refuses_unknown_arguments():
    result = _run("bash", INSTALL_SH, "--frobnicate", check=False)
    assert result.returncode != 0 and "unknown argument --frobnicate" in result.stderr


@pytest.mark.parametrize("variable", ["PREFIX", "SYSTEMD_DIR", "ETC_DIR"])
def test_install_script_refuses_relative_paths(tmp_path, variable):
    """systemd takes absolute paths only: a relative ETC_DIR would install a unit whose
    EnvironmentFile= systemd ignores. Refused before anything is written."""
    if os.geteuid() != 0:
        message = "install.sh must run as root (it checks that first)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    env = {**os.environ, "PREFIX": str(tmp_path / "opt"), "SYSTEMD_DIR": str(tmp_path / "systemd"),
           "ETC_DIR": str(tmp_path / "etc"), variable: "relative/dir"}
    result = _run("bash", INSTALL_SH, "--no-systemctl", "--no-user", env=env, cwd=tmp_path, check=False)
    assert result.returncode != 0 and f"{variable} must be an absolute path" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- Kubernetes -----------------------------------------------------------------------------------

KUSTOMIZE_BASE = PACKAGING / "kubernetes"
GEN_PROMETHEUSRULE = KUSTOMIZE_BASE / "gen_prometheusrule.py"
RULES_FILE = ROOT / "alerts" / "gpuphase-rules.yaml"
K8S_VERSION = "1.30.0"  # validate against a version still in wide use, not only the newest
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: no schema in kubernetes-validate


def _require_rules_file() -> None:
    """The PrometheusRule component is generated from the alert rules; without them it is missing."""
    if not RULES_FILE.exists():
        message = f"{RULES_FILE.relative_to(ROOT)} does not exist yet (python -m gpuphase.alerts.rules writes it)"
        pytest.fail(message) if IN_CI else pytest.skip(message)


def _kustomize(directory: Path) -> list[dict]:
    rendered = _run(require_tool("kubectl"), "kustomize", directory).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds  # one of each in this package
    return {d["kind"]: d for d in docs}


def _validate_builtin(docs: list[dict]) -> None:
    """Every built-in resource against the offline OpenAPI schemas, rejecting unknown fields."""
    require_tool("kubernetes-validate")
    import kubernetes_validate

    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")


def _container(docs: list[dict]) -> dict:
    (container,) = _by_kind(docs)["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return container


def test_base_renders_valid_and_locked_down():
    docs = _kustomize(KUSTOMIZE_BASE)
    _validate_builtin(docs)
    kinds = _by_kind(docs)
    assert set(kinds) == {"Namespace", "ServiceAccount", "DaemonSet", "Service"}
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    container = _container(docs)
    assert pod["hostPID"] is True and pod.get("hostNetwork") is not True
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet/pod-resources")
    assert mount["readOnly"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert {"limits", "requests"} <= set(container["resources"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}


def test_base_args_are_flags_the_agent_accepts_and_ports_match_them():
    from gpuphase.agent.config import OPTIONS_BY_FLAG

    container = _container(_kustomize(KUSTOMIZE_BASE))
    flags = dict(arg[2:].split("=", 1) for arg in container["args"])
    assert set(flags) <= set(OPTIONS_BY_FLAG), set(flags) - set(OPTIONS_BY_FLAG)
    ports = {p["name"]: p for p in container["ports"]}
    assert flags["web.listen-address"].endswith(f":{ports['metrics']['containerPort']}")
    for name, flag in (("otlp-grpc", "otlp.grpc-listen-address"), ("otlp-http", "otlp.http-listen-address")):
        assert flags[flag] == f"0.0.0.0:{ports[name]['containerPort']}"  # reachable through the hostPort
        assert ports[name]["hostPort"] == ports[name]["containerPort"]
    assert "hostPort" not in ports["metrics"]


def test_service_selects_the_agent_pods_on_the_metrics_port():
    kinds = _by_kind(_kustomize(KUSTOMIZE_BASE))
    service, daemonset = kinds["Service"], kinds["DaemonSet"]
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]


def test_all_components_render_and_validate():
    _require_rules_file()
    docs = _kustomize(KUSTOMIZE_BASE / "examples" / "all-components")
    _validate_builtin(docs)
    kinds = _by_kind(docs)
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["securityContext"]["runAsUser"] == 0 and pod["securityContext"]["runAsNonRoot"] is False
    assert _container(docs)["securityContext"]["capabilities"] == {"drop": ["ALL"]}  # root, but powerless


def test_servicemonitor_points_at_the_service():
    """No CRD schema offline: check the fields the operator acts on against the Service they target."""
    _require_rules_file()
    kinds = _by_kind(_kustomize(KUSTOMIZE_BASE / "examples" / "prometheus-operator"))
    monitor, service = kinds["ServiceMonitor"], kinds["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def test_prometheusrule_carries_the_alert_rules_promtool_accepts(tmp_path):
    _require_rules_file()
    kinds = _by_kind(_kustomize(KUSTOMIZE_BASE / "examples" / "prometheus-operator"))
    rule = kinds["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    _run(require_tool("promtool"), "check", "rules", extracted)


def test_committed_prometheusrule_is_up_to_date():
    _require_rules_file()
    result = _run(sys.executable, GEN_PROMETHEUSRULE, "--check", check=False)
    assert result.returncode == 0, result.stderr


SAMPLE_RULES = """\
# comment kept
groups:
  - name: gpuphase.sample
    rules:
      - alert: GpuSample
        expr: |
          gpu_up == 0
        for: 5m
        labels:
          severity: warning

        annotations:
          summary: "GPU {{ $labels.gpu }} is lost"
          description: >-
            folded
            text
"""


def test_generator_wraps_groups_faithfully_and_check_detects_drift(tmp_path):
    rules, output = tmp_path / "rules.yaml", tmp_path / "prometheusrule.yaml"
    rules.write_text(SAMPLE_RULES)
    args = ["--rules", rules, "--output", output]
    assert _run(sys.executable, GEN_PROMETHEUSRULE, *args).returncode == 0
    text = output.read_text()
    assert "  # comment kept\n" in text and "gpu_up == 0" in text
    wrapped = yaml.safe_load(text)
    assert (wrapped["kind"], wrapped["spec"]) == ("PrometheusRule", yaml.safe_load(SAMPLE_RULES))
    assert _run(sys.executable, GEN_PROMETHEUSRULE, "--check", *args).returncode == 0
    rules.write_text(SAMPLE_RULES.replace("5m", "10m"))
    drift = _run(sys.executable, GEN_PROMETHEUSRULE, "--check", *args, check=False)
    assert drift.returncode == 1 and "out of date" in drift.stderr


def test_generator_rejects_a_file_that_is_not_a_rule_file(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("groups: []\nextra: 1\n")
    result = _run(sys.executable, GEN_PROMETHEUSRULE, "--rules", rules, "--output", tmp_path / "o.yaml", check=False)
    assert result.returncode == 2 and "only a top-level 'groups'" in result.stderr


# --- container image ------------------------------------------------------------------------------
# No Docker daemon and no registry access here, so the image is not built in tests; these are the
# hadolint-style rules that matter for it, applied to the parsed Dockerfile.

DOCKERFILE = ROOT / "Dockerfile"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, args = pending.strip().partition(" ")
        logical.append((instruction.upper(), args.strip()))
        pending = ""
    return logical


def test_dockerfile_base_images_are_pinned():
    instructions = _dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    stages: set[str] = set()
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the final image"
    for spec in froms:
        image, *alias = spec.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image not in stages:
            name, _, tag = image.partition(":")
            assert re.fullmatch(r"\d+\.\d+\.\d+[-\w.]*", tag) or "@sha256:" in image, f"{image} is not pinned"
        if alias:
            stages.add(alias[-1])


def test_dockerfile_final_stage_is_non_root_and_runs_the_agent():
    instructions = _dockerfile_instructions()
    final = instructions[max(n for n, (i, _) in enumerate(instructions) if i == "FROM"):]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] == "65532"
    entrypoint = next(a for i, a in final if i == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == ["gpuphase", "run"]  # exec form (JSON), so signals reach the agent
    assert 'gpuphase = "gpuphase.cli:main"' in (ROOT / "pyproject.toml").read_text()
    exposed = {p for i, a in final if i == "EXPOSE" for p in a.split()}
    assert exposed == {"9842", "4317", "4318"}


def test_dockerfile_copies_what_pyproject_packages():
    copied = {args.split()[0] for instruction, args in _dockerfile_instructions()
              if instruction == "COPY" and not args.startswith("--from=")}
    assert copied - {"pyproject.toml", "README*"} == set(PACKAGED_FOLDERS)


def test_dockerfile_hygiene():
    instructions = _dockerfile_instructions()
    for instruction, args in instructions:
        assert instruction != "ADD", "COPY, not ADD: no remote URLs or implicit archive extraction"
        if instruction == "RUN":
            assert "nvidia-smi" not in args
            for pip in re.findall(r"pip install[^&]*", args):
                assert "--no-cache-dir" in pip, pip
        if instruction == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                if "*" not in source:
                    assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_with_basic_auth_the_rendered_probes_pass_and_metrics_stay_locked(tmp_path):
    """The DaemonSet's probes, exactly as rendered with the web-config component, against a real
    agent with basic auth on: the kubelet (no credentials) gets 200, an anonymous scrape 401."""
    import base64
    import urllib.error
    import urllib.request

    import bcrypt

    from tests.agentproc import AgentProcess

    container = _container(_kustomize(KUSTOMIZE_BASE / "examples" / "all-components"))
    (flag,) = [arg for arg in container["args"] if arg.startswith("--web.config.file=")]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "web-config"]
    assert flag.partition("=")[2].startswith(mount["mountPath"] + "/")
    metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert f"--web.listen-address=:{metrics_port}" in container["args"]
    probes = [container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")]
    web_config = tmp_path / "web-config.yml"
    password_hash = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web_config.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": password_hash}}))

    def status(url: str, headers: dict[str, str] | None = None) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    with AgentProcess(["--backend", "sim", "--sim.gpus", "1", f"--web.config.file={web_config}"]) as agent:
        for probe in probes:
            assert probe["port"] == "metrics"
            headers = {h["name"]: h["value"] for h in probe.get("httpHeaders", [])}
            url = f"{probe.get('scheme', 'HTTP').lower()}://127.0.0.1:{agent.metrics_port}{probe['path']}"
            assert status(url, headers) == 200, probe
        assert status(agent.metrics_url) == 401
        credentials = base64.b64encode(b"prometheus:s3cret").decode()
        assert status(agent.metrics_url, {"Authorization": f"Basic {credentials}"}) == 200
