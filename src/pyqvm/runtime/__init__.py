"""Where a VM's processes live: the child processes pyqvm starts and owns (QEMU, virtiofsd,
a network's switch), each reaped and never outliving pyqvm (`children`), and the private
runtime directories their sockets, logs and overlays go in (`dirs`)."""
