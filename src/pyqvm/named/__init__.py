"""Named VMs that outlive the process that started them (``pyqvm up``).

`registry` (who is running, one locked directory per VM), `wire` (the QMP-framed
protocol's translations), `owner` (the process that holds one VM and serves it)
and `client` (`AsyncNamedVM`: `up`, `attach` and AsyncVM's methods over the socket).
"""
