"""``fleet rollout device retry|cancel|stop ROLLOUT DEVICE``: act on one device's update."""

from __future__ import annotations

import typer

from orchestrator.cli.rollout_cmds import ApiUrl, Token, connect, console, rollout_app

device_app = typer.Typer(help="Act on one device's update in a rollout.", no_args_is_help=True)
rollout_app.add_typer(device_app, name="device")

_CONFIRM = {
    "retry": "Give device {d} a new attempt in rollout {r}?",
    "cancel": "Cancel device {d}'s update in rollout {r}? It was not offered yet and will not be.",
    "stop": "Ask device {d} to stop its update in rollout {r}? It drops the download unless it has "
    "begun installing (an install always finishes).",
}
_DONE = {
    "retry": "device {d}: new attempt {attempt} queued ({state})",
    "cancel": "device {d}: {state}",
    "stop": "device {d}: stop requested; it ends CANCELED once the device confirms (now {state})",
}


def _act(
    action: str, rollout_id: int, device_id: str, yes: bool, api_url: str | None, token: str | None
) -> None:
    if not yes and not typer.confirm(_CONFIRM[action].format(d=device_id, r=rollout_id)):
        raise typer.Exit(1)
    with connect(api_url, token) as client:
        row = client.request("POST", f"/v1/rollouts/{rollout_id}/devices/{device_id}/{action}")
    console.print(
        _DONE[action].format(d=device_id, attempt=row["attempt"], state=row["state"]), highlight=False
    )


Yes = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")


@device_app.command("retry")
def retry(
    rollout_id: int, device_id: str, yes: bool = Yes, api_url: ApiUrl = None, token: Token = None
) -> None:
    """A FAILED or TIMED_OUT update gets a new attempt (not after an install-step failure)."""
    _act("retry", rollout_id, device_id, yes, api_url, token)


@device_app.command("cancel")
def cancel(
    rollout_id: int, device_id: str, yes: bool = Yes, api_url: ApiUrl = None, token: Token = None
) -> None:
    """Cancel an update not offered yet."""
    _act("cancel", rollout_id, device_id, yes, api_url, token)


@device_app.command("stop")
def stop(
    rollout_id: int, device_id: str, yes: bool = Yes, api_url: ApiUrl = None, token: Token = None
) -> None:
    """Ask a device offered the update, and not installing, to drop it."""
    _act("stop", rollout_id, device_id, yes, api_url, token)
