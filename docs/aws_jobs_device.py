"""Point a device that runs the AWS IoT Device SDK's jobs client at fleet instead of AWS IoT.

Nothing in the device's jobs code changes; only where it connects:

* endpoint and port: fleet's Mosquitto TLS listener (8883 in docs/deploy), not the AWS IoT
  endpoint (<id>-ats.iot.<region>.amazonaws.com);
* CA: the CA that signed the broker's certificate (var/ca/ca.crt), not the Amazon root CA;
* certificate and key: the device's own, issued by `fleet ca issue THING` (common name = thing name);
* thing name: the fleet device id, registered with protocol aws-jobs
  (POST /v1/devices {"id": THING, "model": ..., "firmware_version": ..., "protocol": "aws-jobs"}).

This script is a condensed version of the SDK's jobs sample: it takes the next job, downloads the
image named in the job document, checks its SHA-256, "installs" it, and reports SUCCEEDED with the
new version (or FAILED with a reason), until no job is left for --idle seconds.

    python docs/aws_jobs_device.py --endpoint broker.example --port 8883 --ca var/ca/ca.crt \
        --cert var/ca/devices/THING.crt --key var/ca/devices/THING.key --thing THING
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from awscrt import mqtt
from awsiot import iotjobs, mqtt_connection_builder

QOS = mqtt.QoS.AT_LEAST_ONCE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--thing", required=True)
    parser.add_argument("--version", default="1.0.0", help="the version running now")
    parser.add_argument("--download-ca", default=None, help="CA for an https:// firmware URL")
    parser.add_argument("--idle", type=float, default=20.0, help="exit after this long without a job")
    args = parser.parse_args()

    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=args.endpoint,
        port=args.port,  # without it the builder uses 443 and ALPN, as for AWS
        cert_filepath=args.cert,
        pri_key_filepath=args.key,
        ca_filepath=args.ca,
        client_id=args.thing,
        clean_session=True,
        keep_alive_secs=30,
        enable_metrics_collection=False,
    )
    connection.connect().result(10)
    jobs = iotjobs.IotJobsClient(connection)
    thing = args.thing
    wake = threading.Event()  # notify-next: a job was queued
    answered = threading.Event()
    asked: dict[str, Any] = {"token": None, "execution": None}

    def on_next(event: iotjobs.NextJobExecutionChangedEvent | None) -> None:
        if event is not None and event.execution is not None:
            wake.set()

    def on_started(response: iotjobs.StartNextJobExecutionResponse | None) -> None:
        # Only the answer to the request just sent: an older one may still be on its way.
        if response is not None and response.client_token == asked["token"]:
            asked["execution"] = response.execution
            answered.set()

    def on_rejected(error: iotjobs.RejectedError | None) -> None:
        print(f"rejected: {error.code if error else '?'} {error.message if error else ''}", flush=True)

    for future, _ in (
        jobs.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), QOS, on_next
        ),
        jobs.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), QOS, on_started
        ),
        jobs.subscribe_to_start_next_pending_job_execution_rejected(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), QOS, on_rejected
        ),
        jobs.subscribe_to_update_job_execution_rejected(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), QOS, on_rejected
        ),
    ):
        future.result(10)

    def update(job_id: str, status: str, **details: str) -> None:
        # statusDetails values: 1-1024 characters, no control characters
        details = {
            k: "".join(c if c.isprintable() else " " for c in v)[:1024] or "-" for k, v in details.items()
        }
        request = iotjobs.UpdateJobExecutionRequest(
            thing_name=thing, job_id=job_id, status=status, status_details=details
        )
        jobs.publish_update_job_execution(request, QOS).result(10)

    version = args.version
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < args.idle:
        asked.update(token=uuid.uuid4().hex, execution=None)
        answered.clear()
        wake.clear()
        jobs.publish_start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing, client_token=asked["token"]), QOS
        ).result(10)
        answered.wait(10)
        execution = asked["execution"]
        if execution is None:
            wake.wait(2)  # notify-next wakes this early when a job is queued
            continue
        firmware = execution.job_document["firmware"]
        update(execution.job_id, "IN_PROGRESS", stage="downloading", progress="0")
        request = urllib.request.Request(
            firmware["url"], headers={"Authorization": f"Bearer {firmware['token']}"}
        )
        context = None
        if args.download_ca:
            import ssl

            context = ssl.create_default_context(cafile=args.download_ca)
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                image = response.read()
        except urllib.error.URLError as exc:
            detail = (
                exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
            )
            update(execution.job_id, "FAILED", reason="download_error", message=f"{exc} {detail}"[:1000])
            print(json.dumps({"job": execution.job_id, "error": f"{exc} {detail}"}), flush=True)
            continue
        if hashlib.sha256(image).hexdigest() != firmware["sha256"]:
            update(
                execution.job_id, "FAILED", reason="checksum", message="sha256 differs from the job document"
            )
        else:
            update(execution.job_id, "IN_PROGRESS", stage="verified", progress="100")
            update(execution.job_id, "IN_PROGRESS", stage="installing", progress="100")
            version = firmware["version"]  # a real device writes the image and reboots here
            update(execution.job_id, "SUCCEEDED", running_version=version)
        print(json.dumps({"job": execution.job_id, "version": version}), flush=True)
        idle_since = time.monotonic()
    connection.disconnect().result(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
