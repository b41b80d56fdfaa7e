"""The gateway service as a process: ``python -m gateway run --config FILE``.

Used by the gateway tests and the site demo. Its JSON log lines go to a file; it is
stopped by its own PID (SIGTERM, which the service answers with a clean hand-over to the
columns' failsafes), and killed only if it does not stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hil.rig.firmware_proc import REPO


class GatewayProcess:
    """``python -m gateway run --config FILE`` with its JSON log lines collected."""

    def __init__(self, config: Path, log_path: Path, *, level: str = "info") -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self._log = open(log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-level", level],
                cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except BaseException:
            self._log.close()
            raise

    def logs(self) -> list[dict[str, Any]]:
        """Every log line so far, as JSON objects ({"raw": line} for anything else)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM to our own process; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()
