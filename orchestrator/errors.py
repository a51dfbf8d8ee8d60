"""One hierarchy of coded domain errors. The API maps them to HTTP in a single handler."""

from __future__ import annotations


class FleetError(Exception):
    """Base of every domain error: a stable machine-readable ``code`` plus a human message."""

    code = "fleet_error"
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class NotFound(FleetError):
    code = "not_found"
    http_status = 404


class AlreadyExists(FleetError):
    code = "already_exists"
    http_status = 409


class InvalidInput(FleetError):
    code = "invalid_input"
    http_status = 422


class IllegalTransition(FleetError):
    """An event that the state machine does not allow from the current state."""

    code = "illegal_transition"
    http_status = 409

    def __init__(self, machine: str, state: str, event: str, *, entity_id: object = None) -> None:
        who = f" {entity_id}" if entity_id is not None else ""
        super().__init__(f"{machine}{who}: event {event} is not allowed in state {state}")
        self.machine = machine
        self.state = state
        self.event = event


class Conflict(FleetError):
    """The request collides with work in progress (e.g. devices already updating in another rollout)."""

    code = "conflict"
    http_status = 409


class ConcurrentUpdate(FleetError):
    """Another writer changed the row first (optimistic version check failed)."""

    code = "concurrent_update"
    http_status = 409


class Unauthorized(FleetError):
    code = "unauthorized"
    http_status = 401


class Forbidden(FleetError):
    code = "forbidden"
    http_status = 403


class PayloadTooLarge(FleetError):
    code = "payload_too_large"
    http_status = 413


class RangeNotSatisfiable(FleetError):
    code = "range_not_satisfiable"
    http_status = 416

    def __init__(self, message: str, *, field: str | None = None, size: int | None = None) -> None:
        super().__init__(message, field=field)
        self.size = size


class ConfigurationError(FleetError):
    code = "configuration_error"
    http_status = 500
