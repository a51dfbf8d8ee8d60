"""Firmware content for devices: HTTP Range for resumable downloads, bearer download token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from orchestrator.api.deps import session_dep, settings_dep
from orchestrator.config import Settings
from orchestrator.errors import Unauthorized
from orchestrator.services.firmware_service import get_firmware
from orchestrator.signing import check_download_token

router = APIRouter(tags=["firmware"])


@router.get("/firmware/{firmware_id}/content", response_class=FileResponse)
def firmware_content(
    firmware_id: int,
    authorization: Annotated[str | None, Header()] = None,
    session: Session = Depends(session_dep),
    settings: Settings = Depends(settings_dep),
) -> FileResponse:
    """The image bytes; supports ``Range`` so devices resume interrupted downloads."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("a download token is required: Authorization: Bearer <token>")
    check_download_token(settings.secret_key, firmware_id, authorization[7:].strip())
    firmware = get_firmware(session, firmware_id)
    return FileResponse(
        firmware.storage_path, media_type="application/octet-stream", filename=f"{firmware.sha256}.bin"
    )
