"""The former name of rehearsal.hosts, from when systemd hosts were one of two backends:
the same module object, so `hosts_systemd.freeze` is `hosts.freeze`. New code imports
rehearsal.hosts."""

import sys

from . import hosts

sys.modules[__name__] = hosts
