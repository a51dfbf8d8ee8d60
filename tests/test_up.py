"""``fleet up``: the supervised all-in-one stack, its demo, and the compose deployment files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_sim.mqtt_link import BrokerAddress, derive_device_password
from orchestrator.config import REPO_ROOT
from orchestrator.embedded import ServerNotFoundError, find_redis_server
from orchestrator.embedded.auth import MqttUser, Role, render_mosquitto_acl
from orchestrator.supervisor import SupervisionError, Supervisor

MARK_VAR = "UP_TEST_MARK"  # inherited by every descendant of the `fleet up` under test


# ------------------------------------------------------------------ helpers
def _marked_pids(mark: str, data_dir: Path) -> list[int]:
    """Running processes carrying ``mark`` in their environment or ``data_dir`` in their command line."""
    found = []
    needle_env = f"{MARK_VAR}={mark}".encode()
    needle_cmd = str(data_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X"):
                continue
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle_env in environ.split(b"\0") or needle_cmd in cmdline:
            found.append(int(entry.name))
    return found


def _wait_gone(mark: str, data_dir: Path, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _marked_pids(mark, data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _fleet_up_argv(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "up", "--data-dir", str(data_dir), *args]


@pytest.fixture
def up_env() -> Iterator[tuple[str, dict[str, str]]]:
    try:
        find_redis_server()
    except ServerNotFoundError:
        pytest.skip("no redis-server available")
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({MARK_VAR: mark, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    yield mark, env


# ------------------------------------------------------------------ end to end
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_up_demo_rolls_out_and_leaves_nothing_behind(
    tmp_path: Path, up_env: tuple[str, dict[str, str]]
) -> None:
    mark, env = up_env
    data_dir = tmp_path / "up"
    argv = _fleet_up_argv(data_dir, "--simulate", "20", "--demo", "--exit-when-done")
    result = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=140)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for label in ("API", "API docs", "portal", "MQTT", "MQTT (WS)", "operator token", "portal MQTT login"):
        assert label in out
    assert "http://127.0.0.1:" in out and "/docs" in out and "ws://127.0.0.1:" in out
    assert "rollout ended COMPLETED; all devices updated" in out
    assert "running version" in out and "1.1.0" in out
    assert not _wait_gone(mark, data_dir), "processes left behind"
    assert not list((data_dir / "run").glob("*.pid"))
    assert not (data_dir / "stack.json").exists()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_up_restarts_a_killed_worker_and_stops_cleanly_on_sigterm(
    tmp_path: Path, up_env: tuple[str, dict[str, str]]
) -> None:
    mark, env = up_env
    data_dir = tmp_path / "up"
    log = (tmp_path / "up.out").open("w")
    proc = subprocess.Popen(
        _fleet_up_argv(data_dir, "--simulate", "5", "--profile", "instant"),
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        stack_file = data_dir / "stack.json"
        deadline = time.monotonic() + 90
        while not stack_file.exists():
            assert proc.poll() is None, (tmp_path / "up.out").read_text()[-4000:]
            assert time.monotonic() < deadline, "stack.json never appeared"
            time.sleep(0.2)
        info: dict[str, Any] = json.loads(stack_file.read_text())
        assert stack_file.stat().st_mode & 0o077 == 0  # it holds secrets
        assert info["operator_token"].startswith("fleet_")
        assert info["portal_mqtt_username"] == "portal" and info["portal_mqtt_password"]
        assert info["mqtt_ws_url"].startswith("ws://127.0.0.1:")
        pids = info["processes"]
        assert set(pids) >= {"redis", "broker", "api", "ingest", "worker1", "beat", "sim"}
        assert all(_alive(pid) for pid in pids.values())
        api_env = Path(f"/proc/{pids['api']}/environ").read_bytes().split(b"\0")
        assert b"FLEET_MQTT_USERNAME=service" in api_env
        assert b"FLEET_PORTAL_MQTT_USERNAME=portal" in api_env
        assert f"FLEET_PORTAL_MQTT_WS_URL={info['mqtt_ws_url']}".encode() in api_env
        old = pids["worker1"]
        os.kill(old, signal.SIGKILL)
        new = old
        deadline = time.monotonic() + 30
        while new == old or not _alive(new):
            assert time.monotonic() < deadline, "worker was not restarted"
            time.sleep(0.2)
            new = json.loads(stack_file.read_text())["processes"]["worker1"]
        output = (tmp_path / "up.out").read_text()
        assert f"worker1 (pid {old}) exited with status -9" in output
        assert f"worker1 restarted as pid {new}" in output
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not _wait_gone(mark, data_dir), "processes left behind"
    assert not list((data_dir / "run").glob("*.pid"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_demo_survives_killing_redis_and_the_broker(
    tmp_path: Path, up_env: tuple[str, dict[str, str]]
) -> None:
    import sqlite3

    mark, env = up_env
    data_dir = tmp_path / "up"
    log = (tmp_path / "up.out").open("w")
    proc = subprocess.Popen(
        _fleet_up_argv(data_dir, "--simulate", "40", "--demo", "--exit-when-done"),
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack_file = data_dir / "stack.json"

    def succeeded() -> int:
        try:
            with sqlite3.connect(data_dir / "fleet.db", timeout=5) as db:
                return int(
                    db.execute("SELECT count(*) FROM device_updates WHERE state = 'SUCCEEDED'").fetchone()[0]
                )
        except sqlite3.Error:
            return 0

    def pid_of(name: str) -> int:
        return int(json.loads(stack_file.read_text())["processes"][name])

    try:
        deadline = time.monotonic() + 120
        while not stack_file.exists() or succeeded() < 3:
            assert proc.poll() is None, (tmp_path / "up.out").read_text()[-4000:]
            assert time.monotonic() < deadline, "the demo rollout did not get going"
            time.sleep(0.2)
        # When Redis, then the broker are killed outright mid-rollout
        for name in ("redis", "broker"):
            old = pid_of(name)
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while pid_of(name) == old or not _alive(pid_of(name)):
                assert proc.poll() is None, (tmp_path / "up.out").read_text()[-4000:]
                assert time.monotonic() < deadline, f"{name} was not restarted"
                time.sleep(0.2)
        # Then the demo still ends with every device updated
        assert proc.wait(240) == 0, (tmp_path / "up.out").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "up.out").read_text()
    assert "rollout ended COMPLETED; all devices updated" in output
    assert "redis restarted as pid" in output and "broker restarted as pid" in output
    assert not _wait_gone(mark, data_dir), "processes left behind"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_cli_in_the_same_directory_finds_the_running_demo(
    tmp_path: Path, up_env: tuple[str, dict[str, str]]
) -> None:
    # Given `fleet up --demo` running from a directory, with its data in the default var/up
    mark, env = up_env
    workdir = tmp_path / "work"
    workdir.mkdir()
    log = (tmp_path / "up.out").open("w")
    argv = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "up",
        "--simulate",
        "10",
        "--demo",
        "--profile",
        "instant",
    ]
    proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    cli = [sys.executable, "-m", "orchestrator.cli", "rollout"]
    try:
        stack_file = workdir / "var" / "up" / "stack.json"
        deadline = time.monotonic() + 120
        listed = ""
        # When the CLI runs there with no FLEET_API_URL or token in its environment
        while "COMPLETED" not in listed:
            assert proc.poll() is None, (tmp_path / "up.out").read_text()[-4000:]
            assert time.monotonic() < deadline, f"the demo's rollout never showed up: {listed}"
            time.sleep(0.5)
            if stack_file.exists():
                result = subprocess.run(
                    [*cli, "list"], env=env, cwd=workdir, capture_output=True, text=True, timeout=30
                )
                listed = result.stdout + result.stderr
        # Then it lists the demo's rollout and shows its status
        assert "sensor-v2" in listed and " 1 " in listed, listed
        status = subprocess.run(
            [*cli, "status", "1"], env=env, cwd=workdir, capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0 and "COMPLETED" in status.stdout, status.stdout + status.stderr
        watch = subprocess.run(
            [*cli, "watch", "1", "--timeout", "20"], env=env, cwd=workdir, capture_output=True, text=True
        )
        assert watch.returncode == 0 and "COMPLETED" in watch.stdout, watch.stdout + watch.stderr
        _check_private_stack(workdir / "var" / "up")
        # An explicit URL still wins (and gets no token: the stack's is for its own API only)
        other = subprocess.run(
            [*cli, "list", "--api-url", "http://127.0.0.1:9"],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
        )
        assert other.returncode == 1 and "cannot connect to the API at http://127.0.0.1:9" in other.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not _wait_gone(mark, workdir), "processes left behind"
    # Once the stack has stopped, the CLI no longer uses its file
    after = subprocess.run([*cli, "list"], env=env, cwd=workdir, capture_output=True, text=True, timeout=30)
    assert after.returncode == 1 and "cannot connect to the API" in after.stderr


def _check_private_stack(data_dir: Path) -> None:
    """What a `fleet up` keeps to itself: its files, its Redis, its download-token key."""
    import urllib.error
    import urllib.request

    import redis

    from orchestrator.config import DEV_ONLY_SECRET
    from orchestrator.signing import make_download_token

    info = json.loads((data_dir / "stack.json").read_text())
    assert data_dir.stat().st_mode & 0o077 == 0
    for path in [data_dir / "fleet.db", data_dir / "secrets.json", data_dir / "keys" / "signing.pem"]:
        assert path.stat().st_mode & 0o077 == 0, path
    assert all(p.stat().st_mode & 0o077 == 0 for p in (data_dir / "logs").iterdir())
    # Redis wants the stack's password
    no_password = info["redis_url"].replace(info["redis_url"].split("@")[0] + "@", "redis://")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(no_password).ping()
    # A download token signed with the public default key fetches nothing
    forged = make_download_token(DEV_ONLY_SECRET, 1, "sim-00000")
    request = urllib.request.Request(
        f"{info['api_url']}/v1/firmware/1/content", headers={"Authorization": f"Bearer {forged}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403 and b"not valid for this firmware" in refused.value.read()


def test_stack_file_is_used_only_when_private_and_alive(tmp_path: Path) -> None:
    from orchestrator.cli.stack_discovery import load_running_stack, resolve_api
    from orchestrator.config import Settings
    from orchestrator.embedded.process import process_start_ticks

    up_dir = tmp_path / "up"
    up_dir.mkdir()
    stack = up_dir / "stack.json"
    info = {
        "pid": os.getpid(),
        "pid_start_ticks": process_start_ticks(os.getpid()),
        "api_url": "http://127.0.0.1:8123",
        "operator_token": "fleet_secret",
    }
    stack.write_text(json.dumps(info))
    stack.chmod(0o644)
    assert load_running_stack(up_dir) is None  # readable by others: not trusted
    stack.chmod(0o600)
    assert load_running_stack(up_dir) is not None
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert resolve_api(settings, None, None) == ("http://127.0.0.1:8123", "fleet_secret")
    # An explicit URL elsewhere never receives the stack's token
    assert resolve_api(settings, "http://10.0.0.1:8000", None) == ("http://10.0.0.1:8000", None)
    explicit = Settings(_env_file=None, data_dir=tmp_path, api_url="http://127.0.0.1:9000")  # type: ignore[call-arg]
    assert resolve_api(explicit, None, None) == ("http://127.0.0.1:9000", None)
    # A stack whose `fleet up` is gone is ignored
    stack.write_text(json.dumps({**info, "pid_start_ticks": (info["pid_start_ticks"] or 0) + 1}))
    assert load_running_stack(up_dir) is None
    assert resolve_api(settings, None, None)[0] == settings.api_url


# ------------------------------------------------------------------ supervisor (no processes)
class FakeChild:
    def __init__(self) -> None:
        self.pid: int | None = 100
        self.returncode: int | None = None
        self.starts = 0
        self.stopped = False

    def is_running(self) -> bool:
        return self.returncode is None

    def start(self) -> None:
        self.starts += 1
        self.pid = 100 + self.starts
        self.returncode = None

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True


def test_supervisor_restarts_with_backoff_then_gives_up() -> None:
    events: list[str] = []
    sup = Supervisor(max_restarts=2, window=60, backoff=0.0, on_event=events.append)
    child = FakeChild()
    sup.add("w", child)
    for expected_starts in (1, 2):
        child.returncode = 1
        sup.check()  # notices the death, schedules the restart
        sup.check()  # backoff (0 s) passed: restarts
        assert child.starts == expected_starts and child.is_running()
    assert any("exited with status 1" in e for e in events)
    child.returncode = 1
    with pytest.raises(SupervisionError, match="giving up"):
        sup.check()


def test_supervisor_essential_child_death_is_fatal_and_stop_is_reversed() -> None:
    order: list[str] = []
    sup = Supervisor()
    a, b = FakeChild(), FakeChild()
    sup.add("a", a, restart=False, stop=lambda: order.append("a"))
    sup.add("b", b, stop=lambda: order.append("b"))
    sup.stop_all()
    assert order == ["b", "a"]
    a.returncode = 0
    with pytest.raises(SupervisionError, match="cannot be restarted"):
        sup.check()


def test_device_passwords_are_derived_per_device() -> None:
    address = BrokerAddress.parse("mqtt://127.0.0.1:1883", password_secret="s3cret")
    assert address.password_for("sim-00000") == derive_device_password("s3cret", "sim-00000")
    assert address.password_for("sim-00000") != address.password_for("sim-00001")
    assert BrokerAddress.parse("mqtt://h:1", "shared").password_for("sim-00000") == "shared"


# ------------------------------------------------------------------ compose deployment
COMPOSE = REPO_ROOT / "docker-compose.yml"
DEPLOY = REPO_ROOT / "docs" / "deploy"


def test_compose_file_has_the_production_services() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) >= {
        "postgres",
        "redis",
        "mosquitto",
        "migrate",
        "api",
        "worker",
        "ingest",
        "beat",
        "sim",
    }
    assert "healthcheck" in services["postgres"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    mosquitto = services["mosquitto"]
    assert mosquitto["image"].startswith("eclipse-mosquitto:2")
    mounts = " ".join(mosquitto["volumes"])
    for role in ("device", "service", "portal"):
        assert f"docs/deploy/mosquitto/acl-{role}" in mounts and f"passwords-{role}" in mounts
    assert "ca.crt" in mounts and "mosquitto.key" in mounts
    published = {p.split(":")[-1] for p in mosquitto["ports"]}
    assert published == {"1883", "8883", "9001"}  # the services listener (1884) stays inside
    assert (
        "--tls-cert-dir" in services["sim"]["command"]
        and "mqtts://mosquitto:8883" in services["sim"]["command"]
    )
    assert services["migrate"]["command"] == ["fleet", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["sim"]["profiles"] == ["sim"]
    for name in ("api", "worker", "ingest", "beat", "sim"):
        service = services[name]
        assert service["build"] == "." and service["env_file"] == ["var/deploy.env"]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Scalable: no fixed container name and no published port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    for path in ("mosquitto/mosquitto.conf", "mosquitto/acl-device", "mosquitto/acl-portal", "env.example"):
        assert (DEPLOY / path).is_file()
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile and "[postgres]" in dockerfile


def test_mosquitto_files_match_the_fleet_acl_rules() -> None:
    users = [
        MqttUser("service", "x", Role.SERVICE),
        MqttUser("portal", "x", Role.PORTAL),
        MqttUser("sim-00000", "x", Role.DEVICE),
    ]
    for role in Role:
        members = [u for u in users if u.role == role]
        expected = render_mosquitto_acl(members, device_patterns=role == Role.DEVICE)
        assert (DEPLOY / "mosquitto" / f"acl-{role.value}").read_text() == expected
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().split("\n")
    assert "per_listener_settings true" in conf and "use_username_as_clientid true" in conf
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert "allow_anonymous false" in conf
    assert "listener 1883" in conf and "listener 9001" in conf and "protocol websockets" in conf
    env = (DEPLOY / "env.example").read_text()
    values = [line.split("=", 1) for line in env.splitlines() if line and not line.startswith("#")]
    secrets_ = {k: v for k, v in values if "PASSWORD" in k or "SECRET" in k}
    assert secrets_ and all("dev-only" in v for v in secrets_.values())


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or Debian's `docker-compose`; neither needs a running engine."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no compose CLI: .ci/run installs Debian's docker-compose")
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copytree(DEPLOY, tmp_path / "docs" / "deploy")
    (tmp_path / "var").mkdir()
    shutil.copy(DEPLOY / "env.example", tmp_path / "var" / "deploy.env")
    result = subprocess.run(
        [*cli, "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    services = subprocess.run(
        [*cli, "--profile", "sim", "config", "--services"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"postgres", "redis", "mosquitto", "migrate", "api", "worker", "ingest", "beat", "sim"} <= set(
        services
    )
    monitoring = subprocess.run(
        [*cli, "--profile", "monitoring", "config", "--services"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"prometheus", "grafana"} <= set(monitoring)


def test_monitoring_profile_scrapes_the_api_and_loads_the_dashboard() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == ["monitoring"] == grafana["profiles"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]
    assert job["authorization"]["credentials_file"] in " ".join(prometheus["volumes"])
    mounts = " ".join(grafana["volumes"])
    assert "docs/deploy/grafana/provisioning" in mounts and "docs/deploy/grafana/dashboards" in mounts
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana/dashboards/fleet.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["datasources"][0]["uid"]}
