"""The rehearsal: boot the program's hosts on this machine as systemd containers in network
namespaces, let the real cloud-init run each host's user-data, and drill failovers under load.

Layers (a newcomer can follow them from the file names):
  layout.py      which hosts, subnets and stand-in addresses (from the real config model)
  netns.py       namespaces, the VPC router, per-host nftables from the deployed security groups
  awsd.py        the AWS stand-ins: moto server (EC2, EFS, SSM, S3, IAM), the IMDS stand-in,
                 the EIP watcher that makes traffic to the Elastic IP follow its association
  deploy.py      `pulumi up` without the cloud: the program's own __main__.py under a mock
                 layer that creates its resources in the stand-ins; read-back checks
  imds_tree.py   the instance metadata tree, as EC2 serves it (/latest/ and dated versions)
  image.py       the Debian host image (debootstrap), cached and rebuilt when its recipe changes
  container.py   one host as a systemd-nspawn container over an overlay of that image
  hosts.py       host lifecycle seen from outside (prepare, start, boot report, kill -9,
                 freeze, exec, systemctl operations)
  (the stand-in portal service ships as cloud_init/scripts/portal_standin.py)
  load.py        the load generator (runs in the client namespace: "the internet")
  http_hygiene.py  HSTS, Server header and TLS floor as a client sees them
  drills/        the failovers, one module per family (lb_network, data, slurm, site,
                 deploy); base.py the shared measurements and the report table/JSON
  __main__.py    `python -m rehearsal up|drill|down|status|run`
"""
