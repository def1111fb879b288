"""The connection to a Ray cluster: the one at RAY_ADDRESS (as `ray job submit` sets it), or a
local one sized to this machine.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from pipeline.core.errors import UserError

# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------


# Ray Train settings of the private single-machine cluster (a user's environment overrides them).
# The Train controller polls its workers every 2 s by default, and each change of state (workers
# placed, started, finished) waits for a poll; its preemption watcher is one more actor to start
# and has nothing to watch on one machine (no node is drained). Measured on the 2-core machine:
# a 20-step `fit` took 25-26 s with Ray's defaults and 19-20 s with these.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                   "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class ClusterError(UserError, RuntimeError):
    """No Ray cluster at RAY_ADDRESS: names the address and the fix."""


# How long the head node's port may take to accept a connection before RAY_ADDRESS is refused
# (ray.init itself retries an address nothing listens at for minutes, printing warnings).
PROBE_TIMEOUT_S = 10.0


def check_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse a RAY_ADDRESS (`host:port`, or a Ray Client `ray://host:port`) whose port
    accepts no connection, in seconds and with one line; `auto` and `local` name no port."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise ClusterError(f"RAY_ADDRESS={address!r} is not an address of a Ray cluster: give "
                           "the head node's host:port (its GCS, 6379 by default) or "
                           "ray://host:10001, or unset it to start a local Ray instance")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(f"no Ray cluster answers at RAY_ADDRESS={address} ({reason}): start "
                           "it (`ray start --head` on the head node) or unset RAY_ADDRESS to "
                           "start a local Ray instance") from None


def connect(num_cpus: Optional[int] = None) -> str:
    """Connect to the cluster at RAY_ADDRESS (ClusterError where nothing answers there), or
    start a local one. Returns a description."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return f"connected to Ray cluster at {address}"
    start_local_cluster(num_cpus)
    return f"started a local Ray instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"


def start_local_cluster(num_cpus: Optional[int] = None, log_to_driver: bool = True) -> str:
    """Start a private single-machine Ray instance (this process its driver) and return its
    address, 127.0.0.1:<GCS port>. Other processes join it with RAY_ADDRESS set to that.

    On loopback, without token auth, with the Train settings of LOCAL_TRAIN_ENV. The dashboard
    process serves the state API that Ray Train uses to clean up after its controller: its
    PlacementGroupCleaner actor finds the cluster through RAY_ADDRESS, or fails when several
    Ray instances run on the machine (and a stopped sweep trial's placement group then holds
    its CPUs until the stage ends). So the GCS gets a port chosen here, and every process of
    the cluster inherits RAY_ADDRESS pointing at it (set while Ray starts, then restored).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    gcs_port = _free_port()
    address = f"127.0.0.1:{gcs_port}"
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update({"RAY_ADDRESS": address, "RAY_GCS_SERVER_PORT": str(gcs_port)})
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                 configure_logging=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return address



def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
