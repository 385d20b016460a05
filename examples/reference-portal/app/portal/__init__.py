"""Reference HPC portal services (api, auth, cae, ws) for the app hosts: see ../README.md."""
