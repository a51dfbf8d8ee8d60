"""Firmware images: upload (multipart), list, details, and the content devices download.

The content route is authorized by a per-device download token (from the desired-state document),
not by an API token; it supports HTTP Range so devices resume interrupted downloads.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Path, Query, Response, UploadFile
from fastapi.responses import FileResponse

from orchestrator.api.deps import AppSettings, DbSession, Operator, Viewer, actor
from orchestrator.api.schemas import FirmwareOut, FirmwarePage, Name, errors
from orchestrator.errors import Unauthorized
from orchestrator.services import query_service
from orchestrator.services.firmware_service import (
    add_firmware,
    check_range,
    delete_firmware,
    deprecate_firmware,
    get_firmware,
    require_update_in_progress,
)
from orchestrator.services.query_service import MAX_LIMIT
from orchestrator.signing import check_download_token

router = APIRouter(prefix="/firmware", tags=["firmware"])
FirmwareId = Annotated[int, Path(ge=1, le=2**31 - 1, description="firmware id")]


@router.post("", status_code=201, response_model=FirmwareOut, responses=errors(400, 401, 403, 409, 413, 422))
def upload_firmware(
    file: Annotated[UploadFile, File(description="the image")],
    model: Annotated[Name, Form(examples=["sensor-v2"])],
    version: Annotated[Name, Form(examples=["1.1.0"])],
    session: DbSession,
    settings: AppSettings,
    _: Operator,
    signature: Annotated[
        str | None,
        Form(
            max_length=128,
            description="base64 ed25519 signature over the manifest; must verify against the fleet "
            "public key. Omitted: the server signs the image with its own key.",
        ),
    ] = None,
) -> FirmwareOut:
    """Store a new image (content-addressed by sha256). (model, version) must be new (else 409);
    larger than FLEET_MAX_FIRMWARE_BYTES is 413."""
    firmware = add_firmware(session, settings, file.file, model=model, version=version, signature=signature)
    return FirmwareOut.model_validate(firmware)


@router.get("", response_model=FirmwarePage, responses=errors(401, 403, 422))
def list_firmware(
    session: DbSession,
    _: Viewer,
    model: Annotated[Name | None, Query(description="only images for this model")] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> FirmwarePage:
    """Images in upload order."""
    page = query_service.list_firmware(session, model=model, cursor=cursor, limit=limit)
    return FirmwarePage(
        items=[FirmwareOut.model_validate(f) for f in page.items], next_cursor=page.next_cursor
    )


@router.get("/{firmware_id}", response_model=FirmwareOut, responses=errors(401, 403, 404, 422))
def firmware_details(firmware_id: FirmwareId, session: DbSession, _: Viewer) -> FirmwareOut:
    """One image's metadata."""
    return FirmwareOut.model_validate(get_firmware(session, firmware_id))


@router.post("/{firmware_id}/deprecate", response_model=FirmwareOut, responses=errors(401, 403, 404, 422))
def deprecate(firmware_id: FirmwareId, session: DbSession, token: Operator) -> FirmwareOut:
    """Deprecate an image: no new rollout may use it; rollouts already using it go on. Idempotent."""
    return FirmwareOut.model_validate(deprecate_firmware(session, firmware_id, actor=actor(token)))


@router.delete("/{firmware_id}", status_code=204, responses=errors(401, 403, 404, 409, 422))
def delete(firmware_id: FirmwareId, session: DbSession, token: Operator) -> Response:
    """Delete an image and its file; 409 while any rollout refers to it (deprecate it instead)."""
    delete_firmware(session, firmware_id, actor=actor(token))
    return Response(status_code=204)


@router.get(
    "/{firmware_id}/content",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the image (206 for a Range)"},
        **errors(401, 403, 404, 416, 422),
    },
)
def firmware_content(
    firmware_id: FirmwareId,
    session: DbSession,
    settings: AppSettings,
    authorization: Annotated[str | None, Header(description="Bearer <download token>")] = None,
    range_: Annotated[
        str | None, Header(alias="range", description="bytes=START- or bytes=START-END")
    ] = None,
) -> FileResponse:
    """The image bytes; supports ``Range`` so devices resume interrupted downloads.

    The token must be valid for this image and name a device that has an update of it in progress.
    """
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("a download token is required: Authorization: Bearer <token>")
    device_id = check_download_token(settings.secret_key, firmware_id, authorization[7:].strip())
    firmware = get_firmware(session, firmware_id)
    require_update_in_progress(session, firmware_id, device_id)
    if range_ is not None:
        check_range(range_, firmware.size)
    session.close()  # not held open while the bytes stream
    return FileResponse(
        firmware.storage_path, media_type="application/octet-stream", filename=f"{firmware.sha256}.bin"
    )
