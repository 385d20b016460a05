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
# HTTP services: 64 threads. A request to a stalled backend holds its thread until a
# time-out (a frozen Galera writer: ~3.5 s until the DB writer cuts it; a frozen Redis
# master: the 1 s socket time-out, per try), and HAProxy's health check needs a free one
# within 1 s: with 16 threads a frozen host that was both writer and Redis master starved
# every app host's pool and the LB had no server for 12 s (freeze-galera). Threads cost
# no database connections (db.py keeps a bounded pool).
threads = int(os.environ.get("PORTAL_THREADS", "200" if _ws else "64"))
# A worker that does not report for 30 s is restarted (the gthread worker reports from
# its main loop, so long-lived websockets do not trip it).
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
proc_name = f"hpc-portal-{os.environ.get('PORTAL_SERVICE', '?')}-{_port}"
