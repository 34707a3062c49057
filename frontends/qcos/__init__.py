"""The QCOS measurement-and-control (qcos-mc/1) device front end."""
