"""SQLAlchemy models; importing this package registers every table on ``Base.metadata``."""

from orchestrator.models.api_token import ApiToken
from orchestrator.models.audit_entry import AuditEntry
from orchestrator.models.base import Base, utcnow
from orchestrator.models.device import Device
from orchestrator.models.device_group import DeviceGroup
from orchestrator.models.device_update import DeviceUpdate
from orchestrator.models.event import Event
from orchestrator.models.firmware import Firmware
from orchestrator.models.job_execution import JobExecution
from orchestrator.models.rollout import Rollout
from orchestrator.models.wave import Wave
from orchestrator.models.webhook import WebhookCursor, WebhookDelivery, WebhookEndpoint

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Base",
    "Device",
    "DeviceGroup",
    "DeviceUpdate",
    "Event",
    "Firmware",
    "JobExecution",
    "Rollout",
    "Wave",
    "WebhookCursor",
    "WebhookDelivery",
    "WebhookEndpoint",
    "utcnow",
]
