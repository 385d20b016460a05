"""The program and its daemons without the cloud, shared by tests/, tools/ and rehearsal/:

  harness.py   run the real `__main__.py` for a stack file under mocks (no Pulumi CLI)
  mocks.py     strict mocks: every resource type and invoke the program uses, nothing else
  contexts.py  render contexts of every host with fixed stand-ins for AWS-assigned values
  mariadb.py   a throwaway MariaDB (wsrep on) for the migration tests and benchmarks

Nothing here imports tests/; tests/ and tools/ import from here.
"""
