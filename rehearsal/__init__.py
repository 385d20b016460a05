"""The rehearsal: boot the rendered topology on this machine in network namespaces, run
the real daemons from each host's rendered user-data, and drill failovers under load.

Layers (a newcomer can follow them from the file names):
  layout.py      which hosts, subnets and stand-in addresses (from the real config model)
  netns.py       namespaces, the VPC router, per-host nftables from the security matrix
  awsd.py        the AWS stand-ins: moto server (EC2, SSM, S3), the IMDS stub, the EIP
                 watcher that makes traffic to the Elastic IP follow its association, and
                 the deploy step (render every host, user-data into RunInstances)
  hostsetup.sh   one host's private root, mounts and hostname, then its init
  hostinit.py    PID 1 of a host: fetches its user-data from IMDS, writes the files, runs
                 runcmd, and starts what the systemd units would start (no systemd here)
  systemctl_shim.py  /usr/bin/systemctl inside a host: asks the host's init
  hosts.py       host lifecycle seen from outside (start, kill -9, reboot, exec)
  (the stand-in portal service ships as cloud_init/scripts/portal_standin.py)
  load.py        the load generator (runs in the client namespace: "the internet")
  drills.py      the failovers and their measurements; report.py the table and JSON
  __main__.py    `python -m rehearsal up|drill|down|status|run`
"""
