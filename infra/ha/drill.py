"""The head-node failover drill: real Slurm, real recovery code, the embedded AWS endpoint.

One run, for one design:

1. deploy the design against the endpoint (``infra.ha.deploy``) for a throw-away cluster name;
2. boot the first head: ``head_boot.boot`` claims the EIP and creates/mounts the shared volume
   (``infra.ha.local_ebs`` gives the EBS records their bytes);
3. start a real Slurm (``infra.clusters.slurm_local``, its own state dir, munged and ports) whose
   ``StateSaveLocation`` is on the shared volume; the job scripts live there too;
4. submit jobs that take a few seconds, more than the node runs at once, so some are queued;
   wait until slurmctld has saved them (it saves asynchronously, within ~5 s);
5. kill the head: SIGKILL slurmctld, its mount disappears, the instance is terminated in the
   emulator (asg: after the terminate hook's snapshot; the group's subnets are reordered first
   so the replacement lands in the other AZ, as after losing an AZ);
6. recover with the deployed handlers (run in-process from the deployed function's handler
   string and environment), boot the new head, start slurmctld on the restored state
   (``slurmctld -f conf``, no ``-c``: it recovers its saved jobs);
7. RTO = kill -> the EIP is on the new head and the controller answers; then wait for every
   job and count: a job is completed if Slurm says COMPLETED and its output marker exists.

Where moto 5.2.5 has no behaviour, the drill plays AWS's part and says so in ``emulated``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from infra.aws.clients import AwsTarget
from infra.backends.shell_safety import safe_arg
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.layout import LocalSlurmError
from infra.ha import head_boot as hb
from infra.ha.config import HaConfig
from infra.ha.deploy import Deployment, deploy
from infra.ha.local_ebs import LocalEbs

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}
EMULATED = {
    "lambda": "handlers run in-process from the deployed function's Handler and Environment "
              "(moto runs Lambda code only in Docker)",
    "ebs_data": "volumes are directories and snapshots tar archives, driven by the EC2 calls "
                "(infra/ha/local_ebs.py); moto keeps only the records",
    "instance_boot": "head_boot.boot() runs in-process with the instance's id and AZ from the "
                     "API instead of IMDS",
    "alarm_action": "moto never runs alarm actions: the drill sets the alarm to ALARM and "
                    "delivers the alarm event to the recovery function",
    "lifecycle_hooks": "moto stores lifecycle hooks but never fires them: the drill delivers "
                       "the EventBridge lifecycle events to the hook functions",
    "complete_lifecycle_action": "moto answers HTTP 500 (not implemented); tolerated and logged "
                                 "only on the embedded endpoint",
    "az_loss": "the group's subnets are reordered so the replacement lands in the other AZ "
               "(moto always launches in the first subnet)",
}


class DrillError(RuntimeError):
    """The drill could not run (not: the recovery lost jobs, which the result reports)."""


@dataclass
class DrillOptions:
    design: str = "standby"
    region: str = "us-east-1"
    jobs: int = 6
    job_seconds: float = 8.0
    lose_az: bool = True
    workdir: Path | None = None
    keep: bool = False
    timeout_s: float = 180.0


@dataclass
class LocalContext:
    """What a Lambda handler sees as ``context``, plus the local invoker's endpoint and env."""

    function_name: str
    invoked_function_arn: str
    aws_target: AwsTarget
    environment: dict[str, str]
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    memory_limit_in_mb: int = 256

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


class LocalLambda:
    """Invokes a deployed function's handler in this process, exactly as configured."""

    def __init__(self, target: AwsTarget) -> None:
        self.target = target

    def invoke(self, function: str, event: dict[str, Any]) -> dict[str, Any]:
        conf = self.target.client("lambda").get_function_configuration(FunctionName=function)
        module, attr = conf["Handler"].rsplit(".", 1)
        handler = getattr(importlib.import_module(module), attr)
        ctx = LocalContext(function_name=conf["FunctionName"],
                           invoked_function_arn=conf["FunctionArn"], aws_target=self.target,
                           environment=conf.get("Environment", {}).get("Variables", {}))
        # Through JSON, as Lambda returns it: a handler result that is not JSON fails here too.
        return json.loads(json.dumps(handler(json.loads(json.dumps(event)), ctx)))


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def alarm_event(alarm: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    """The event CloudWatch passes to a Lambda alarm action, built from the stored alarm."""
    dims = {d["Name"]: d["Value"] for d in alarm.get("Dimensions", [])}
    return {
        "source": "aws.cloudwatch", "alarmArn": alarm["AlarmArn"], "accountId": account,
        "time": _now_iso(), "region": region,
        "alarmData": {
            "alarmName": alarm["AlarmName"],
            "state": {"value": alarm["StateValue"], "reason": alarm.get("StateReason", ""),
                      "timestamp": _now_iso()},
            "configuration": {"description": alarm.get("AlarmDescription", ""), "metrics": [{
                "id": "m1", "returnData": True,
                "metricStat": {"metric": {"namespace": alarm["Namespace"],
                                          "name": alarm["MetricName"], "dimensions": dims},
                               "period": alarm["Period"], "stat": alarm["Statistic"]}}]},
        },
    }


def lifecycle_event(hook: dict[str, Any], instance_id: str, account: str, region: str,
                    ) -> dict[str, Any]:
    """The EventBridge event Auto Scaling emits for a lifecycle hook, from the stored hook."""
    launching = hook["LifecycleTransition"].endswith("LAUNCHING")
    return {
        "version": "0", "id": str(uuid.uuid4()), "source": "aws.autoscaling",
        "detail-type": f"EC2 Instance-{'launch' if launching else 'terminate'} Lifecycle Action",
        "account": account, "time": _now_iso(), "region": region,
        "resources": [f"arn:aws:autoscaling:{region}:{account}:autoScalingGroup:"
                      f"{uuid.uuid4()}:autoScalingGroupName/{hook['AutoScalingGroupName']}"],
        "detail": {"LifecycleActionToken": str(uuid.uuid4()),
                   "AutoScalingGroupName": hook["AutoScalingGroupName"],
                   "LifecycleHookName": hook["LifecycleHookName"], "EC2InstanceId": instance_id,
                   "LifecycleTransition": hook["LifecycleTransition"]},
    }


# --------------------------------------------------------------------------- Slurm side


class SlurmHead:
    """The drill's own single-node Slurm, with StateSaveLocation on the shared volume."""

    # slurmstepd binds Unix sockets in SlurmdSpoolDir (<state dir>/spool/slurmd/<node>_<job>.
    # <step>): past 108 bytes every job fails to launch, so a deep work dir gets a short one.
    MAX_STATE_DIR = 60

    def __init__(self, root: Path, mount_point: Path) -> None:
        self.state_save = mount_point / "slurmctld-state"
        self.jobs_dir = mount_point / "jobs"
        self.out_dir = root / "cluster-fs"  # stands for a cluster filesystem (FSx, NFS)
        state_dir = root / "slurm"
        self._temp_state = len(str(state_dir)) > self.MAX_STATE_DIR
        if self._temp_state:
            state_dir = Path(tempfile.mkdtemp(prefix="cf-ha-slurm-"))
        self.cluster = LocalSlurm(state_dir, state_save_location=self.state_save)
        self.env = {**os.environ, **self.cluster.env()}

    def up(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cluster.up(timeout=60)

    def run(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def submit(self, n: int, seconds: float) -> list[str]:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        ids = []
        for k in range(n):
            script = self.jobs_dir / f"job-{k}.sh"
            script.write_text(
                f"#!/bin/bash\n#SBATCH --job-name=ha-drill-{k}\n#SBATCH --ntasks=1\n"
                f"sleep {float(seconds)}\n"
                f"echo \"$SLURM_JOB_ID\" > {safe_arg(self.out_dir, 'drill dir')}"
                "/done-$SLURM_JOB_ID\n")
            proc = self.run("sbatch", "--parsable", "-o", str(self.out_dir / "job-%j.out"),
                            "-D", str(self.out_dir), str(script))
            if proc.returncode != 0:
                raise DrillError(f"sbatch failed: {proc.stderr.strip()}")
            ids.append(proc.stdout.strip().split(";")[0])
        return ids

    def states(self) -> dict[str, str] | None:
        """Job id -> state for every job the controller holds; None if it does not answer."""
        proc = self.run("squeue", "-h", "-t", "all", "-o", "%i|%T")
        if proc.returncode != 0:
            return None
        return dict(line.split("|", 1) for line in proc.stdout.split())

    def wait_running(self, ids: list[str], timeout: float) -> float:
        """Wall time at which some of ``ids`` was seen running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states() or {}
            if any(states.get(i) == "RUNNING" for i in ids):
                return time.time()
            time.sleep(0.1)
        raise DrillError(f"no drill job started within {timeout:.0f} s; slurmd log:\n"
                         f"{self.cluster.layout.log_file('slurmd').read_text()[-2000:]}")

    def wait_saved(self, since: float, timeout: float = 30) -> float:
        """Wait for a job_state written after ``since`` (after the last sbatch returned).

        slurmctld saves asynchronously, at most once per 5 s (SAVE_MAX_WAIT): a crash loses
        the jobs accepted since its last save. That is Slurm's own recovery point, which no
        head-node design changes; the drill measures losses beyond it.
        """
        path = self.state_save / "job_state"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= since:
                    return path.stat().st_mtime - since
            time.sleep(0.05)
        raise DrillError(f"slurmctld did not save its job state to {path} within {timeout} s")

    def crash(self) -> None:
        """SIGKILL slurmctld and its helper (slurmscriptd): no shutdown, no final state save."""
        pid = self.cluster.pid("slurmctld")
        if pid is None:
            raise DrillError("slurmctld is not running")
        children = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(c) for c in (task / "children").read_text().split()]
        for p in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.cluster.pid("slurmctld") is not None and time.monotonic() < deadline:
            time.sleep(0.02)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.cluster.layout.log_file("slurmctld").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start_controller(self) -> None:
        # `slurmctld -f conf` without -c: it recovers jobs and nodes from StateSaveLocation.
        self.cluster.start_daemon("slurmctld")

    def down(self) -> None:
        with contextlib.suppress(LocalSlurmError, OSError, subprocess.SubprocessError):
            self.cluster.down(cancel_jobs=True)

    def remove(self) -> None:
        if self._temp_state:
            shutil.rmtree(self.cluster.layout.root, ignore_errors=True)


# --------------------------------------------------------------------------- the drill


class Drill:
    def __init__(self, target: AwsTarget, opts: DrillOptions) -> None:
        if opts.design not in ("standby", "asg"):
            raise DrillError(f"unknown design {opts.design!r}: use standby or asg")
        if not target.endpoint_url:
            raise DrillError("the drill terminates instances: it runs only against a local "
                             "endpoint (the embedded one, or AWS_ENDPOINT_URL), never real AWS")
        self.target, self.opts = target, opts
        self.cluster = f"drill-{uuid.uuid4().hex[:8]}"
        base = opts.workdir or Path(os.environ.get("CLUSTERFLOW_HOME", ".clusterflow")) / "ha"
        self.root = (base / self.cluster).resolve()
        self.mount_point = self.root / "head" / "shared"
        zones = [f"{opts.region}a", f"{opts.region}b"]
        self.cfg = HaConfig(cluster=self.cluster, design=opts.design,  # type: ignore[arg-type]
                            region=opts.region, availability_zones=zones,
                            shared_volume={"mount_point": str(self.mount_point)})
        self.ec2 = target.client("ec2")
        self.lam = LocalLambda(target)
        self.seconds: dict[str, float] = {}
        self.emulated: list[str] = ["lambda", "ebs_data", "instance_boot"]
        self.lifecycle_results: list[str] = []

    # ---- helpers

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 3)

    def _identity(self, instance_id: str) -> hb.Identity:
        inst = hb.instance(self.ec2, instance_id)
        return hb.Identity(instance_id, inst["Placement"]["AvailabilityZone"], self.opts.region)

    def _boot(self, ebs: LocalEbs, instance_id: str) -> dict[str, Any]:
        v = self.cfg.shared_volume
        return hb.boot(self.ec2, self._identity(instance_id), cluster=self.cluster,
                       mount_point=v.mount_point,
                       spec=hb.VolumeSpec(v.device, v.size_gib, v.volume_type),
                       mounter=ebs, wait_delay=1)

    def _hook(self, dep: Deployment, transition: str) -> dict[str, Any]:
        hooks = self.target.client("autoscaling").describe_lifecycle_hooks(
            AutoScalingGroupName=dep.asg_name)["LifecycleHooks"]
        return next(h for h in hooks if h["LifecycleTransition"] == transition)

    def _deliver_hook(self, dep: Deployment, kind: str, instance_id: str) -> dict[str, Any]:
        transition = ("autoscaling:EC2_INSTANCE_LAUNCHING" if kind == "launch"
                      else "autoscaling:EC2_INSTANCE_TERMINATING")
        event = lifecycle_event(self._hook(dep, transition), instance_id, dep.account,
                                self.opts.region)
        result = self.lam.invoke(dep.functions[kind], event)
        self.lifecycle_results.append(result.get("lifecycle", ""))
        return result

    def _group_instance(self, dep: Deployment) -> str:
        group = self.target.client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[dep.asg_name])["AutoScalingGroups"][0]
        live = [i["InstanceId"] for i in group["Instances"]
                if i["LifecycleState"] in ("Pending", "Pending:Wait", "InService")]
        if len(live) != 1:
            raise DrillError(f"the group {dep.asg_name} has {len(live)} live instances, not 1")
        return live[0]

    def _eip_on(self, dep: Deployment) -> str | None:
        return self.ec2.describe_addresses(
            AllocationIds=[dep.eip_allocation_id])["Addresses"][0].get("InstanceId")

    # ---- phases

    def _first_head(self, dep: Deployment, ebs: LocalEbs) -> str:
        if dep.design == "standby":
            assert dep.primary_id and dep.standby_id
            standby = self._boot(ebs, dep.standby_id)  # its one boot before being stopped
            if standby["active"]:
                raise DrillError(f"the standby {dep.standby_id} claimed the head's resources")
            self._boot(ebs, dep.primary_id)
            return dep.primary_id
        head = self._group_instance(dep)
        self.emulated.append("lifecycle_hooks")
        self._deliver_hook(dep, "launch", head)
        self._boot(ebs, head)
        return head

    def _fail_and_recover(self, dep: Deployment, ebs: LocalEbs, old: str) -> tuple[str, dict]:
        """Everything between the crash and the new head's boot; returns (new head, handler)."""
        ec2 = self.ec2
        if dep.design == "standby":
            ec2.terminate_instances(InstanceIds=[old])
            cw = self.target.client("cloudwatch")
            cw.set_alarm_state(AlarmName=dep.alarm_name, StateValue="ALARM",
                               StateReason="drill: head node failed its status checks")
            self.emulated.append("alarm_action")
            alarm = cw.describe_alarms(AlarmNames=[dep.alarm_name])["MetricAlarms"][0]
            result = self.lam.invoke(dep.functions["recovery"],
                                     alarm_event(alarm, dep.account, self.opts.region))
            if result.get("action") != "failed-over":
                raise DrillError(f"the recovery handler did not fail over: {result}")
            new = result["new_instance"]
        else:
            asg = self.target.client("autoscaling")
            if self.opts.lose_az:
                zones = list(dep.subnets)
                old_az = self._identity(old).availability_zone
                order = [az for az in zones if az != old_az] + [old_az]
                asg.update_auto_scaling_group(
                    AutoScalingGroupName=dep.asg_name,
                    VPCZoneIdentifier=",".join(dep.subnets[az] for az in order))
                self.emulated.append("az_loss")
            result = self._deliver_hook(dep, "terminate", old)
            ec2.terminate_instances(InstanceIds=[old])  # the group replaces it at once
            new = self._group_instance(dep)
            if new == old:
                raise DrillError("the group did not replace the terminated head")
            result = {"terminate": result, "launch": self._deliver_hook(dep, "launch", new)}
        self._boot(ebs, new)
        return new, result

    def run(self) -> dict[str, Any]:
        opts = self.opts
        self.root.mkdir(parents=True, exist_ok=True)
        ebs = LocalEbs(self.root / "ebs")
        slurm = SlurmHead(self.root, self.mount_point)
        try:
            with ebs.attached_to(self.ec2):
                with self._timed("deploy"):
                    dep = deploy(self.target, self.cfg, wait_delay=1)
                with self._timed("first_boot"):
                    old = self._first_head(dep, ebs)
                with self._timed("slurm_up"):
                    slurm.up()
                with self._timed("submit"):
                    ids = slurm.submit(opts.jobs, opts.job_seconds)
                    submitted = time.time()
                with self._timed("state_saved"):
                    # Fail with jobs both running and queued, as slurmctld last saved them.
                    started = slurm.wait_running(ids, opts.timeout_s)
                    slurm.wait_saved(max(submitted, started))
                before = slurm.states() or {}
                at_failure = {s: sum(1 for i in ids if before.get(i) == s)
                              for s in ("PENDING", "RUNNING", "COMPLETED")}
                old_az = self._identity(old).availability_zone

                t_fail = time.monotonic()
                slurm.crash()
                ebs.unmount(self.mount_point)  # the dead head's mount dies with it
                new, handler = self._fail_and_recover(dep, ebs, old)
                slurm.start_controller()
                while slurm.states() is None or self._eip_on(dep) != new:
                    if time.monotonic() - t_fail > opts.timeout_s:
                        raise DrillError(
                            f"no controller answering with the EIP on {new} after "
                            f"{opts.timeout_s:.0f} s; slurmctld log:\n{slurm.log_tail()}")
                    time.sleep(0.05)
                rto = time.monotonic() - t_fail
                self.seconds["recovery"] = round(rto, 3)

                with self._timed("drain"):
                    final = self._wait_jobs(slurm, ids, opts.timeout_s)
            done = {p.name.removeprefix("done-") for p in slurm.out_dir.glob("done-*")}
            completed = [i for i in ids if final.get(i) == "COMPLETED" and i in done]
            new_az = self._identity(new).availability_zone
            return {
                "design": opts.design, "cluster": self.cluster, "aws": self.target.label,
                "rto_seconds": round(rto, 3),
                "jobs_before": len(ids), "jobs_completed": len(completed),
                "jobs_lost": len(ids) - len(completed),
                "jobs_at_failure": at_failure,
                "job_states": {i: final.get(i, "UNKNOWN") for i in ids},
                "old_az": old_az, "new_az": new_az,
                "old_instance": old, "new_instance": new, "eip": dep.public_ip,
                "handler": handler, "lifecycle_completion": sorted(set(self.lifecycle_results)),
                "ebs": list(ebs.log),
                "seconds": self.seconds,
                "emulated": {k: EMULATED[k] for k in dict.fromkeys(
                    [*self.emulated, *(["complete_lifecycle_action"]
                                       if "not-implemented-by-emulator"
                                       in self.lifecycle_results else [])])},
                "slurm": {"state_dir": str(slurm.cluster.layout.root),
                          "state_save_location": str(slurm.state_save)},
            }
        finally:
            slurm.down()
            if not opts.keep:
                slurm.remove()
                ebs.remove()
                shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _wait_jobs(slurm: SlurmHead, ids: list[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = slurm.states() or states
            # A job the restored controller does not know is lost: it will not come back.
            if states and all(states.get(i) in TERMINAL or i not in states for i in ids):
                return states
            time.sleep(0.25)
        return states


def run_drill(target: AwsTarget, opts: DrillOptions) -> dict[str, Any]:
    return Drill(target, opts).run()
