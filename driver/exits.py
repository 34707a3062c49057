"""Every exit status the `qpi-driver` command uses, by the sysexits.h names the os
module carries, and what each means here. The systemd units' RestartPreventExitStatus=
lists the ones a restart cannot fix (65, 69, 77, 78); the README has the table."""

from __future__ import annotations

import os

EX_DATAERR = os.EX_DATAERR  # 65: the result store is damaged (`qpi-driver store recover`)
EX_NOINPUT = os.EX_NOINPUT  # 66: store tools: no store where asked
EX_UNAVAILABLE = os.EX_UNAVAILABLE  # 69: the chosen executor cannot run here
EX_SOFTWARE = os.EX_SOFTWARE  # 70: a part of the daemon kept failing
EX_CANTCREAT = os.EX_CANTCREAT  # 73: the data directory (or a fresh store) cannot be written
EX_IOERR = os.EX_IOERR  # 74: store tools: the store cannot be read
EX_TEMPFAIL = os.EX_TEMPFAIL  # 75: store tools: the store is in use (stop the daemon)
EX_NOPERM = os.EX_NOPERM  # 77: the orchestrator failed the CA pin (possible interception)
EX_CONFIG = os.EX_CONFIG  # 78: configuration error, rejected token, unknown executor option
EX_SIGPIPE = 128 + 13  # a tool's reader went away (`| head`), as a C tool's exit reads
