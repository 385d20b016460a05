"""The failover drills, each under load through the VIP, and what they measure.

  base.py        targets, Result, load and its measurements, alert check, registry, report
  lb_network.py  lb, app: the front door (HAProxy + keepalived + the Elastic IP)
  data.py        redis, galera, galera-full, restore: Redis Sentinel, MariaDB Galera, backups
  slurm.py       slurm: the slurmctld pair with jobs queued through the portal
  site.py        az: a whole availability zone goes dark
  deploy.py      rolling: the phased replacement of the web/app hosts
  gray.py        freeze-lb, freeze-redis, freeze-galera, freeze-slurm, freeze-app,
                 no-false-failover: whole hosts paused (cgroup freezer), then thawed
  crash.py       crash-burst: two Galera nodes' mariadbd killed within a second
  power.py       power-loss: the three data hosts lose power; their disks drop what was
                 not fsynced (rehearsal/lazyfs.py), then the documented recovery
  ec2api.py      ec2-api: an LB failover while EC2 throttles, then while it answers late
  slurmhost.py   slurm-host: the whole primary Slurm host dies; accounting answers
  partition.py   partition-redis, partition-galera, partition-lb: one host cut from its
                 peers only (asymmetric), probed both ways
  slow.py        slow-galera: one Galera node held to 1 % of a CPU (flow control);
                 efs-stall: the Slurm state directory (EFS) stops answering for 30 s

`Drills` is every family on one object; `Drills(...).drill(name)` runs the drill that
registered under `name` and ORDER is the order a full rehearsal runs them in.
"""

from __future__ import annotations

from .base import ORDER, REGISTRY, SMOKE, TARGETS, Result, rto_of, table, write_report
from .crash import CrashDrills
from .data import DataDrills
from .deploy import DeployDrills
from .ec2api import Ec2ApiDrills
from .gray import GrayDrills
from .lb_network import LbNetworkDrills
from .partition import PartitionDrills
from .power import PowerDrills
from .site import SiteDrills
from .slow import SlowDrills
from .slurm import SlurmDrills
from .slurmhost import SlurmHostDrills


class Drills(LbNetworkDrills, DataDrills, SlurmDrills, SiteDrills, DeployDrills, GrayDrills,
             PartitionDrills, CrashDrills, PowerDrills, Ec2ApiDrills, SlurmHostDrills, SlowDrills):
    """Every drill family on one object sharing the layout, the load and the secrets."""


if set(REGISTRY) != set(ORDER):
    raise RuntimeError(f"drills registered {sorted(REGISTRY)} but ORDER lists {sorted(ORDER)}")

__all__ = ["ORDER", "SMOKE", "TARGETS", "Drills", "Result", "rto_of", "table", "write_report"]
