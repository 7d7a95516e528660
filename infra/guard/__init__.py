"""Blocking hostile addresses in front of a cluster: ``clusterflow guard``.

Each exposure gets the control that can see the client: subnet network ACLs (deny entries)
for SSH/Slurm on the head and login nodes, WAF IP sets in the web ACLs of an ALB (REGIONAL)
or a CloudFront distribution (CLOUDFRONT), and, since security groups cannot deny, an audit
and a reversible lockdown of world-open ingress. A DynamoDB table records every block (where,
why, by whom, until when) so unblocking removes exactly what blocking added.
"""
