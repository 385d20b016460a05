"""Next phase, run by another team as its own stack: read the portal stack's outputs
(VIP, hosts, network, security groups) and build on them. Here: a Route53 health check
of the portal through the VIP with a CloudWatch alarm, and one security group that lets
the team's own tools reach the portal hosts' node exporters — nothing re-declared, every
id taken from the portal stack."""

import pulumi
import pulumi_aws as aws

config = pulumi.Config()
portal = pulumi.StackReference(config.require("portal_stack"))

vip = portal.require_output("vip")
network = portal.require_output("network")
hosts = portal.require_output("hosts")

check = aws.route53.HealthCheck(
    "portal-https",
    type="HTTPS",
    ip_address=vip.apply(lambda v: v["public_ip"]),
    port=443,
    resource_path="/health",
    request_interval=30,
    failure_threshold=3,
    tags={"Name": "portal-https"},
)
aws.cloudwatch.MetricAlarm(
    "portal-https-down",
    namespace="AWS/Route53",
    metric_name="HealthCheckStatus",
    dimensions={"HealthCheckId": check.id},
    statistic="Minimum",
    period=60,
    evaluation_periods=2,
    comparison_operator="LessThanThreshold",
    threshold=1,
    alarm_description="The portal does not answer through its VIP",
)
tools_sg = aws.ec2.SecurityGroup(
    "team-tools",
    vpc_id=network.apply(lambda n: n["vpc_id"]),
    description="the next phase's tools",
)
aws.vpc.SecurityGroupIngressRule(
    "exporters-from-team-tools",
    security_group_id=network.apply(lambda n: n["security_groups"]["monitoring"]),
    referenced_security_group_id=tools_sg.id,
    ip_protocol="tcp",
    from_port=9090,
    to_port=9090,
    description="prometheus from the team's tools",
)
pulumi.export("portal_url", vip.apply(lambda v: f"https://{v['public_ip']}/"))
pulumi.export("health_check_id", check.id)
pulumi.export("data_hosts", hosts.apply(lambda h: sorted(n for n, x in h.items() if "data" in x["roles"])))
