"""The live channels to one running QEMU: its QMP session (`qmp`), the guest agent
(`agent`), the serial console (`console`) and the table of devices hot-plugged into it
(`devices`)."""
