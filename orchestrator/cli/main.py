"""``fleet``: run the services, manage the database, firmware and rollouts."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from orchestrator.api.token_cli import token_app
from orchestrator.cli import (
    audit_cmd,
    broker_cmd,
    demo_cmd,
    device_action_cmds,  # noqa: F401 - registers `fleet rollout device`
    inventory_cmds,
    rollout_cmds,
    up_cmd,
    webhook_cmds,
)
from orchestrator.cli.ca_cmd import ca_app
from orchestrator.config import get_settings
from orchestrator.errors import FleetError

app = typer.Typer(help="fleet: firmware fleet-update orchestrator", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(rollout_cmds.firmware_app, name="firmware")
app.add_typer(rollout_cmds.rollout_app, name="rollout")
app.add_typer(inventory_cmds.devices_app, name="devices")
app.add_typer(inventory_cmds.group_app, name="group")
app.add_typer(webhook_cmds.webhook_app, name="webhook")
app.command("demo")(demo_cmd.demo)
app.command("audit")(audit_cmd.audit)
app.command("up")(up_cmd.up)
app.command("broker-users")(broker_cmd.broker_users)
app.add_typer(token_app, name="token")
app.add_typer(ca_app, name="ca")
console = Console(stderr=True)

try:
    from device_sim.cli import app as sim_app

    app.add_typer(sim_app, name="sim", help="Run a simulated device fleet.")
except ImportError:  # pragma: no cover - device_sim is part of the same distribution
    pass


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Create or migrate the schema at FLEET_DATABASE_URL."""
    from orchestrator.db import upgrade_database

    url = get_settings().database_url
    upgrade_database(url, revision)
    console.print(f"[green]database at {url} is at revision {revision}[/]")


@db_app.command("check")
def db_check() -> None:
    """Fail if the models and the migrated schema differ."""
    from orchestrator.db import check_database

    check_database(get_settings().database_url)
    console.print("[green]no drift between models and migrations[/]")


@app.command()
def worker(
    concurrency: int = typer.Option(2, "--concurrency", "-c"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    name: str = typer.Option("worker@%h", "--name", "-n"),
) -> None:
    """Run a Celery worker (same as `celery -A orchestrator.worker worker`)."""
    from orchestrator.worker import app as celery_app

    argv = ["worker", "-c", str(concurrency), "-l", loglevel, "-n", name]
    if get_settings().celery_events:
        argv.append("-E")  # task events for Flower / `celery events`
    celery_app.worker_main(argv)


@app.command()
def beat(loglevel: str = typer.Option("INFO", "--loglevel", "-l")) -> None:
    """Run Celery beat: the periodic reconciler."""
    from orchestrator.worker import app as celery_app

    celery_app.start(["beat", "-l", loglevel])


@app.command()
def ingest(
    client_id: str = typer.Option(None, help="MQTT client id (fixed id = persistent session)"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Consume device reports, info and presence; mirror progress to portal topics."""
    from orchestrator.ingest.service import run_ingest

    _logging(loglevel)
    settings = get_settings()
    if client_id:
        settings = settings.model_copy(update={"ingest_client_id": client_id})
    run_ingest(settings)


@app.command()
def api(
    host: str = typer.Option(None, help="bind address (default FLEET_API_HOST)"),
    port: int = typer.Option(None, help="port (default FLEET_API_PORT)"),
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from orchestrator.api.access_log import log_config
    from orchestrator.api.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level="info",
        log_config=log_config(),
        ssl_certfile=str(settings.api_tls_cert) if settings.api_tls_cert else None,
        ssl_keyfile=str(settings.api_tls_key) if settings.api_tls_key else None,
    )


def main() -> None:
    try:
        app()
    except FleetError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        sys.exit(2)


if __name__ == "__main__":
    main()
