"""Run a shell script on an EC2 instance through SSM Run Command (``AWS-RunShellScript``).

This is how clusterflow reaches a ParallelCluster head node: no SSH key, no open port 22, no
bastion; the instance only needs the SSM agent (on every ParallelCluster AMI) and the
``AmazonSSMManagedInstanceCore`` policy (``HeadNode.Iam.AdditionalIamPolicies`` in the shipped
configs). Output comes back through ``GetCommandInvocation``, which keeps at most 24,000
characters of stdout and 8,000 of stderr, so scripts sent here print small results and fetch
large files in chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.backends.remote_shell import CommandResult, RemoteCommandError

DOCUMENT = "AWS-RunShellScript"
RUNNING = ("Pending", "InProgress", "Delayed", "Cancelling")
STDOUT_LIMIT = 24000


@dataclass(frozen=True)
class SsmShell:
    aws: AwsTarget
    instance_id: str
    timeout_s: int = 600
    max_poll_s: float = 2.0

    def run(self, script: str, *, comment: str = "clusterflow") -> CommandResult:
        ssm = self.aws.client("ssm")
        try:
            sent = ssm.send_command(
                InstanceIds=[self.instance_id], DocumentName=DOCUMENT, Comment=comment[:100],
                Parameters={"commands": [script], "executionTimeout": [str(self.timeout_s)]},
                TimeoutSeconds=max(30, min(self.timeout_s, 2592000)),
            )
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("InvalidInstanceId", "InvalidInstanceInformationFilterValue"):
                raise RemoteCommandError(
                    f"instance {self.instance_id} cannot take SSM commands ({code}): it must be "
                    "running with the SSM agent online and an instance profile that includes "
                    "AmazonSSMManagedInstanceCore (HeadNode.Iam.AdditionalIamPolicies in the "
                    "cluster config)") from None
            raise
        command_id = sent["Command"]["CommandId"]
        deadline = time.monotonic() + self.timeout_s + 60
        delay = 0.2
        while True:
            try:
                inv = ssm.get_command_invocation(CommandId=command_id,
                                                 InstanceId=self.instance_id)
            except ClientError as e:
                # Right after SendCommand the invocation may not be registered yet.
                if e.response["Error"]["Code"] != "InvocationDoesNotExist":
                    raise
                inv = {"Status": "Pending"}
            if inv["Status"] not in RUNNING:
                return CommandResult(status=inv["Status"],
                                     exit_code=int(inv.get("ResponseCode", -1)),
                                     stdout=inv.get("StandardOutputContent", ""),
                                     stderr=inv.get("StandardErrorContent", ""))
            if time.monotonic() > deadline:
                raise RemoteCommandError(f"SSM command {command_id} on {self.instance_id} still "
                                         f"{inv['Status']} after {self.timeout_s} s")
            time.sleep(delay)
            delay = min(delay * 1.5, self.max_poll_s)

