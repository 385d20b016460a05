"""gunicorn settings for every portal service (read by bin/hpc-portal-service).

gthread workers: a few processes, each with a thread pool. The websocket service needs
threads (each open websocket holds one, see portal/ws.py); the HTTP services use the same
worker so one configuration is tested. Bind and port come from the unit
(PORT, BACKEND_<port>_HOST from /etc/hpc/portal.env)."""

import os

_port = os.environ["PORT"]
_ws = os.environ.get("PORTAL_SERVICE") == "ws"

wsgi_app = "portal.wsgi:app"
bind = [f"{os.environ.get(f'BACKEND_{_port}_HOST', '0.0.0.0')}:{_port}"]
worker_class = "gthread"
workers = int(os.environ.get("PORTAL_WORKERS", "2"))
# Sized for a backend that stalls, not for the usual load: while the Galera writer or the
# Redis master is frozen, every request that needs it holds its thread until the DB
# writer cuts it (~3.5 s) or Redis's socket time-out and rediscovery. At ~20 requests/s per
# host that is 70-100 requests in flight (Little's law). With 16 threads per process (32
# per host) they queued in gunicorn, HAProxy's health checks (answered at once, but only
# by a free thread) timed out on every app host at once, and the LB had no server left:
# a 12 s outage of the whole portal when the frozen data host was both the writer and the
# Redis master (a full run's freeze-galera, 2026-12-03). 64 per process (128 per host)
# keeps a thread free for the checks; an idle gthread thread costs little memory.
threads = int(os.environ.get("PORTAL_THREADS", "200" if _ws else "64"))
# A worker that does not report for 30 s is restarted (the gthread worker reports from
# its main loop, so long-lived websockets do not trip it).
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
proc_name = f"hpc-portal-{os.environ.get('PORTAL_SERVICE', '?')}-{_port}"
