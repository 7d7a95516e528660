"""ParallelCluster 3 lifecycle through ``pcluster.lib``, and the teardown policy that keeps a
cluster from outliving its work.

Lifecycle: ``create`` (from a ``ValidatedCluster``: the config passed ParallelCluster's schema,
clusterflow's checks and the account look-ups, so nothing is created from a bad file),
``describe``, ``update_compute_fleet``, ``delete``. ``pcluster.lib``'s own ``wait=True`` blocks
silently for the 10-20 minutes a cluster takes; clusterflow calls it with ``wait=False`` and
polls ``describe_cluster`` and the stack events itself, reporting each new state and event to
a progress callback (the Prefect logger in flows, a rich status line in the CLI). Jobs are
submitted on the head node through SSM Run Command (``infra.backends.ssm``,
``infra.backends.providers.parallelcluster``).

``pcluster.lib`` builds its boto3 clients from the environment, not from clusterflow's
``AwsTarget``; ``pcluster_env`` points it at the target (region, ``AWS_ENDPOINT_URL`` for a
local endpoint, throw-away credentials for the embedded one) for the duration of each call.

Teardown (``teardown:`` in the spec):

- ``after_run`` (default): the cluster is deleted when the run ends, failed or not;
- ``{idle_minutes: N}``: deleted once no job has been pending or running for N minutes; idle
  time starts at the last job's end (``squeue`` end times, then the exit-code files clusterflow's
  jobs leave on shared storage, then the cluster's creation time). The pipeline checks at the
  end of each run; ``watch_idle`` (or ``reap_if_idle`` on a schedule) enforces it afterwards;
- ``never``: kept; the run's log says so, with the command that deletes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.aws.clients import EMBEDDED_CREDENTIALS, AwsTarget
from infra.backends.remote_shell import RemoteCommandError, RemoteShell
from infra.backends.shell_safety import safe_arg
from infra.backends.ssm import SsmShell
from infra.clusters.parallelcluster_validate import ValidatedCluster, validate_cluster_config

Progress = Callable[[str], None]
FleetStatus = Literal["START_REQUESTED", "STOP_REQUESTED", "ENABLED", "DISABLED"]
SLURM_PATH = "export PATH=/opt/slurm/bin:$PATH"
_env_lock = threading.RLock()


def _quiet(_: str) -> None:
    pass


class ParallelClusterError(RuntimeError):
    """ParallelCluster refused or failed an operation; the message says what to do."""


class ClusterNotFound(ParallelClusterError):
    pass


class ClusterCreateFailed(ParallelClusterError):
    pass


# ---------------------------------------------------------------- teardown policy (pure)


class IdleMinutes(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    idle_minutes: int = Field(ge=1, le=7 * 24 * 60)


TeardownPolicy = Literal["after_run", "never"] | IdleMinutes


@dataclass(frozen=True)
class TeardownDecision:
    delete: bool
    reason: str


def teardown_decision(policy: TeardownPolicy, *, run_finished: bool, busy: bool,
                      idle_since: datetime | None, now: datetime) -> TeardownDecision:
    """Whether the cluster goes now. ``busy``: a job is pending or running on it."""
    if policy == "never":
        return TeardownDecision(False, "teardown: never")
    if policy == "after_run":
        if run_finished:
            return TeardownDecision(True, "teardown: after_run and the run has ended")
        return TeardownDecision(False, "teardown: after_run and the run is not over")
    if busy:
        return TeardownDecision(False, "jobs are pending or running")
    if idle_since is None:
        return TeardownDecision(False, "idle time unknown")
    idle = now - idle_since
    limit = timedelta(minutes=policy.idle_minutes)
    if idle >= limit:
        return TeardownDecision(True, f"idle for {idle.total_seconds() / 60:.0f} min "
                                      f"(teardown after {policy.idle_minutes})")
    left = (limit - idle).total_seconds() / 60
    return TeardownDecision(False, f"idle for {idle.total_seconds() / 60:.0f} min; deleted "
                                   f"after {policy.idle_minutes} ({left:.0f} min left)")


# squeue states of a job that still holds or wants the cluster.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


@dataclass(frozen=True)
class Activity:
    busy: bool
    last_end: datetime | None


def parse_squeue(text: str) -> Activity:
    """``squeue -h -a -t all -o '%i|%T|%e'`` -> busy?, latest end time (UTC)."""
    busy, ends = False, []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3:
            continue
        _, state, end = parts
        if state.upper() in ACTIVE_STATES:
            busy = True
        elif re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", end):
            # Slurm prints the controller's local time; ParallelCluster head nodes run UTC.
            ends.append(datetime.fromisoformat(end).replace(tzinfo=timezone.utc))
    return Activity(busy, max(ends) if ends else None)


def idle_since(activity: Activity, last_exit_epoch: float | None,
               created: datetime | None) -> datetime | None:
    candidates = [t for t in (
        activity.last_end,
        datetime.fromtimestamp(last_exit_epoch, timezone.utc) if last_exit_epoch else None,
        created,
    ) if t is not None]
    return max(candidates) if candidates else None


# ---------------------------------------------------------------- pcluster.lib access


@contextlib.contextmanager
def pcluster_env(aws: AwsTarget) -> Iterator[None]:
    """Point ``pcluster.lib`` (which reads the environment) at ``aws`` for one call."""
    updates = {"AWS_DEFAULT_REGION": aws.region}
    if aws.endpoint_url:
        updates["AWS_ENDPOINT_URL"] = aws.endpoint_url
    if aws.embedded:
        updates["AWS_ACCESS_KEY_ID"] = EMBEDDED_CREDENTIALS["aws_access_key_id"]
        updates["AWS_SECRET_ACCESS_KEY"] = EMBEDDED_CREDENTIALS["aws_secret_access_key"]
    with _env_lock:
        old = {k: os.environ.get(k) for k in updates}
        os.environ.update(updates)
        from pcluster.aws.aws_api import AWSApi

        AWSApi.reset()  # its cached clients may point at another endpoint or region
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            AWSApi.reset()


def _default_api() -> Any:
    import pcluster.lib as pc

    return pc


def map_error(e: Exception, *, cluster: str, region: str, action: str) -> ParallelClusterError:
    """A ``pcluster.lib`` exception as an error a user can act on."""
    from pcluster.api.errors import ParallelClusterApiException

    if isinstance(e, ParallelClusterApiException):
        content = e.content.to_dict() if hasattr(e.content, "to_dict") else {}
        message = content.get("message") or str(e)
        if e.code == 404:
            return ClusterNotFound(
                f"cluster '{cluster}' does not exist in {region} ({action}): create it with the "
                "parallelcluster backend, or check the name and region")
        errors = content.get("configuration_validation_errors") or []
        if errors:
            lines = "\n".join(f"  {x.get('level')} {x.get('type')}: {x.get('message')}"
                              for x in errors)
            return ParallelClusterError(f"ParallelCluster refused to {action} '{cluster}': "
                                        f"{message}\n{lines}")
        return ParallelClusterError(f"ParallelCluster could not {action} '{cluster}' "
                                    f"(HTTP {e.code}): {message}")
    text = str(e).strip()
    with contextlib.suppress(ValueError, TypeError):
        import json

        text = json.loads(text).get("message", text)
    return ParallelClusterError(f"ParallelCluster could not {action} '{cluster}': {text}")


def _as_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass
class ParallelCluster:
    """One named cluster in one region, driven through ``pcluster.lib`` (``api``)."""

    name: str
    aws: AwsTarget
    api: Any = field(default_factory=_default_api)
    poll_s: float = 30.0

    @property
    def region(self) -> str:
        return self.aws.region

    def _call(self, op: str, action: str, **kwargs: Any) -> Any:
        with pcluster_env(self.aws):
            try:
                return getattr(self.api, op)(cluster_name=self.name, region=self.region, **kwargs)
            except Exception as e:  # pcluster.lib raises API and CLI exceptions alike
                raise map_error(e, cluster=self.name, region=self.region, action=action) from e

    def describe(self) -> dict[str, Any] | None:
        try:
            return dict(self._call("describe_cluster", "describe"))
        except ClusterNotFound:
            return None

    def head_node_instance_id(self) -> str:
        desc = self.describe()
        if desc is None:
            raise ClusterNotFound(f"cluster '{self.name}' does not exist in {self.region}")
        head = desc.get("headNode") or {}
        if not head.get("instanceId") or head.get("state") not in (None, "running"):
            raise ParallelClusterError(
                f"cluster '{self.name}' has no running head node (status "
                f"{desc.get('clusterStatus')}, head node {head.get('state', 'absent')})")
        return str(head["instanceId"])

    def shell(self) -> SsmShell:
        return SsmShell(self.aws, self.head_node_instance_id())

    def create(self, config: ValidatedCluster, *, wait: bool = True,
               progress: Progress = _quiet, timeout_s: float = 3600,
               rollback_on_failure: bool = True) -> dict[str, Any]:
        """Create the cluster unless it exists; with ``wait``, until CREATE_COMPLETE."""
        if config.region != self.region:
            raise ParallelClusterError(f"the config is for {config.region} but the cluster is "
                                       f"addressed in {self.region}")
        desc = self.describe()
        if desc is not None:
            status = desc.get("clusterStatus")
            if status in ("CREATE_FAILED", "DELETE_IN_PROGRESS", "DELETE_FAILED"):
                raise ClusterCreateFailed(
                    f"cluster '{self.name}' exists in state {status}: delete it (pcluster "
                    f"delete-cluster -n {self.name} -r {self.region}) and run again")
            progress(f"cluster {self.name} exists ({status})")
        else:
            # Checked again against the account right before the only call that creates:
            # a missing subnet or key pair is refused here, not in CloudFormation.
            validate_cluster_config(config.raw, source=config.source, aws=self.aws)
            self._call("create_cluster", "create", cluster_configuration=config.raw,
                       rollback_on_failure=rollback_on_failure, wait=False)
            progress(f"creating cluster {self.name} in {self.region}")
        return self.wait_until_created(progress=progress, timeout_s=timeout_s) if wait else (
            self.describe() or {})

    def _events(self, seen: set[str]) -> list[dict[str, Any]]:
        try:
            events = self._call("get_cluster_stack_events", "read events of").get("events", [])
        except ParallelClusterError:
            return []
        new = [e for e in events if e.get("eventId") not in seen]
        seen.update(e.get("eventId", "") for e in new)
        return sorted(new, key=lambda e: str(e.get("timestamp")))

    def wait_until_created(self, *, progress: Progress = _quiet, timeout_s: float = 3600,
                           ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        last = None
        while True:
            desc = self.describe()
            if desc is None:
                raise ClusterCreateFailed(f"cluster '{self.name}' disappeared while being "
                                          "created (rolled back?)")
            status = desc.get("clusterStatus")
            if status != last:
                progress(f"cluster {self.name}: {status}")
                last = status
            for ev in self._events(seen):
                progress(f"  {ev.get('resourceStatus')} {ev.get('logicalResourceId')}"
                         + (f": {ev['resourceStatusReason']}"
                            if ev.get("resourceStatusReason") else ""))
            if status in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
                return desc
            if status in ("CREATE_FAILED", "DELETE_IN_PROGRESS", "DELETE_COMPLETE",
                          "DELETE_FAILED"):
                failures = "; ".join(f"{f.get('failureCode')}: {f.get('failureReason')}"
                                     for f in desc.get("failures", []) or [])
                raise ClusterCreateFailed(
                    f"cluster '{self.name}' ended in {status}"
                    + (f" ({failures})" if failures else "")
                    + f"; see 'pcluster get-cluster-stack-events -n {self.name} -r "
                      f"{self.region}'")
            if time.monotonic() > deadline:
                raise ClusterCreateFailed(f"cluster '{self.name}' still {status} after "
                                          f"{timeout_s:.0f} s")
            time.sleep(self.poll_s)

    def update_compute_fleet(self, status: FleetStatus) -> dict[str, Any]:
        return dict(self._call("update_compute_fleet", "update the compute fleet of",
                               status=status))

    def delete(self, *, wait: bool = True, progress: Progress = _quiet,
               timeout_s: float = 3600) -> bool:
        """Delete the cluster; False when there was none. Shared storage follows each
        volume's ``DeletionPolicy`` (the shipped configs snapshot ``/shared``)."""
        try:
            self._call("delete_cluster", "delete", wait=False)
        except ClusterNotFound:
            return False
        progress(f"deleting cluster {self.name}")
        deadline = time.monotonic() + timeout_s
        while wait:
            desc = self.describe()
            if desc is None or desc.get("clusterStatus") == "DELETE_COMPLETE":
                progress(f"cluster {self.name} deleted")
                break
            if desc.get("clusterStatus") == "DELETE_FAILED":
                raise ParallelClusterError(
                    f"deleting cluster '{self.name}' failed; see 'pcluster "
                    f"get-cluster-stack-events -n {self.name} -r {self.region}'")
            if time.monotonic() > deadline:
                raise ParallelClusterError(f"cluster '{self.name}' still deleting after "
                                           f"{timeout_s:.0f} s")
            time.sleep(self.poll_s)
        return True


# ---------------------------------------------------------------- enforcing the policy


def activity_script(remote_root: str) -> str:
    return "\n".join([
        SLURM_PATH,
        "echo '==squeue=='",
        "squeue -h -a -t all -o '%i|%T|%e' 2>/dev/null || true",
        "echo '==last_exit=='",
        f"find {safe_arg(remote_root, 'remote_root')} -name '*.exitcode' -printf '%T@\\n' "
        "2>/dev/null | sort -n | "
        "tail -1",
    ])


def sections(text: str) -> dict[str, str]:
    """Split ``==name==`` delimited script output into its sections."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.fullmatch(r"==(\w+)==", line.strip())
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def check_idle(cluster: ParallelCluster, shell: RemoteShell, remote_root: str,
               ) -> tuple[Activity, datetime | None]:
    result = shell.run(activity_script(remote_root), comment="clusterflow idle check")
    parts = sections(result.stdout)
    activity = parse_squeue(parts.get("squeue", ""))
    last_exit = parts.get("last_exit", "").strip()
    desc = cluster.describe() or {}
    since = idle_since(activity, float(last_exit) if last_exit else None,
                       _as_datetime(desc.get("creationTime")))
    return activity, since


def enforce_teardown(cluster: ParallelCluster, policy: TeardownPolicy, *,
                     shell: RemoteShell | None = None, remote_root: str = "/fsx/clusterflow",
                     run_finished: bool = True, now: datetime | None = None,
                     progress: Progress = _quiet) -> TeardownDecision:
    """Apply the policy once: delete the cluster if it is due, say why either way."""
    now = now or datetime.now(timezone.utc)
    busy, since = False, None
    if isinstance(policy, IdleMinutes):
        if cluster.describe() is None:
            return TeardownDecision(False, f"cluster {cluster.name} does not exist")
        try:
            activity, since = check_idle(cluster, shell or cluster.shell(), remote_root)
        except (RemoteCommandError, ParallelClusterError) as e:
            # Never delete on a guess: an unreadable queue keeps the cluster, and says so.
            progress(f"cluster {cluster.name} stays up: its queue could not be read ({e})")
            return TeardownDecision(False, f"idle check failed: {e}")
        busy = activity.busy
    decision = teardown_decision(policy, run_finished=run_finished, busy=busy,
                                 idle_since=since, now=now)
    if decision.delete:
        progress(f"deleting cluster {cluster.name}: {decision.reason}")
        cluster.delete(wait=True, progress=progress)
    elif policy == "never":
        progress(f"cluster {cluster.name} stays up (teardown: never); delete it with "
                 f"'pcluster delete-cluster -n {cluster.name} -r {cluster.region}'")
    else:
        progress(f"cluster {cluster.name} stays up: {decision.reason}")
    return decision


def watch_idle(cluster: ParallelCluster, policy: IdleMinutes, *, shell: RemoteShell | None = None,
               remote_root: str = "/fsx/clusterflow", poll_s: float = 60.0,
               progress: Progress = _quiet,
               clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
               sleep: Callable[[float], None] = time.sleep) -> TeardownDecision:
    """Block until the idle policy deletes the cluster (or it is gone)."""
    while True:
        if cluster.describe() is None:
            return TeardownDecision(False, f"cluster {cluster.name} is gone")
        decision = enforce_teardown(cluster, policy, shell=shell, remote_root=remote_root,
                                    now=clock(), progress=progress)
        if decision.delete:
            return decision
        sleep(poll_s)


@contextlib.contextmanager
def cluster_session(cluster: ParallelCluster, config: ValidatedCluster, policy: TeardownPolicy,
                    *, progress: Progress = _quiet, remote_root: str = "/fsx/clusterflow",
                    timeout_s: float = 3600) -> Iterator[ParallelCluster]:
    """Create (or reuse) the cluster for a run and apply the teardown policy when the run
    ends, whether it succeeded, failed or was cancelled."""
    cluster.create(config, wait=True, progress=progress, timeout_s=timeout_s)
    try:
        yield cluster
    finally:
        enforce_teardown(cluster, policy, remote_root=remote_root, run_finished=True,
                         progress=progress)
