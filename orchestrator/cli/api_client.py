"""A small synchronous client for the fleet HTTP API, used by the operator CLI.

Every failure becomes an :class:`ApiError` whose text says what went wrong and what to do next,
so commands can print it and exit non-zero without a traceback.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from orchestrator.config import Settings

CONNECT_HINT = (
    "is the API running? start it with `fleet up` (or `make demo`) in this directory, or `fleet api`; "
    "elsewhere, set FLEET_API_URL (or --api-url)"
)
TOKEN_HINT = "set FLEET_API_TOKEN or pass --token (create one with `fleet token create --role operator`)"
OPERATOR_HINT = "this needs an operator token (create one with `fleet token create --role operator`)"


class ApiError(Exception):
    """A request that did not succeed; ``str()`` is the text to show the operator."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field


def _error_from_response(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    code = body.get("code") if isinstance(body.get("code"), str) else None
    field = body.get("field") if isinstance(body.get("field"), str) else None
    server = str(body.get("message") or response.reason_phrase or "request failed")
    status = response.status_code
    if status == 401:
        text = f"the API refused the token ({server}); {TOKEN_HINT}"
    elif status == 403:
        text = f"{OPERATOR_HINT}; the API said: {server}"
    elif 400 <= status < 500:
        text = server if field is None or field in server else f"{server} (field: {field})"
    else:
        text = f"the API failed with HTTP {status}: {server}; see the API's log"
    return ApiError(text, status=status, code=code, field=field)


class _ProgressReader(io.BufferedReader):
    """A file opened for reading that reports every chunk read (drives an upload progress bar)."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._on_read = on_read

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if chunk:
            self._on_read(len(chunk))
        return chunk


class ApiClient:
    """Bearer-token client for ``/v1``; use as a context manager."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, api_url: str | None = None, token: str | None = None
    ) -> ApiClient:
        """Explicit options win over FLEET_API_URL / FLEET_API_TOKEN, which win over a local ``fleet up``
        (see :mod:`orchestrator.cli.stack_discovery`)."""
        from orchestrator.cli.stack_discovery import resolve_api

        url, chosen = resolve_api(settings, api_url, token)
        return cls(url, chosen)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------- plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; the decoded JSON body on success, else :class:`ApiError`."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiError(f"cannot connect to the API at {self.base_url}: {CONNECT_HINT}") from exc
        except httpx.TimeoutException as exc:
            raise ApiError(f"the API at {self.base_url} did not answer in time: {CONNECT_HINT}") from exc
        except httpx.HTTPError as exc:
            raise ApiError(f"request to {self.base_url}{path} failed ({exc}): {CONNECT_HINT}") from exc
        if response.status_code >= 400:
            raise _error_from_response(response)
        if not response.content:
            return None
        return response.json()

    def pages(self, path: str, params: dict[str, Any], limit: int) -> Iterator[dict[str, Any]]:
        """Items of a cursor-paginated listing, at most ``limit`` of them."""
        seen = 0
        cursor: str | None = None
        while seen < limit:
            query = {**params, "limit": min(limit - seen, 1000)}
            if cursor:
                query["cursor"] = cursor
            page = self.request("GET", path, params=query)
            for item in page["items"]:
                yield item
                seen += 1
            cursor = page.get("next_cursor")
            if not cursor or not page["items"]:
                return

    # ---------------------------------------------------------------- firmware
    def upload_firmware(
        self,
        path: Path,
        *,
        model: str,
        version: str,
        signature: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        data = {"model": model, "version": version}
        if signature:
            data["signature"] = signature
        with _ProgressReader(path, on_progress or (lambda _n: None)) as stream:
            files = {"file": (path.name, stream, "application/octet-stream")}
            result: dict[str, Any] = self.request("POST", "/v1/firmware", data=data, files=files)
        return result

    def firmware(self, firmware_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/firmware/{firmware_id}")
        return result

    # ---------------------------------------------------------------- rollouts
    def create_rollout(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/rollouts", json=body)
        return result

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/rollouts/{rollout_id}")
        return result

    def rollout_action(self, rollout_id: int, action: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/rollouts/{rollout_id}/{action}")
        return result
