"""Where laked keeps its socket, pid file and log (light: the CLI imports it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = Path(os.environ.get("LAKED_RUN_DIR", "/run/lake"))


@dataclass
class Config:
    run_dir: Path = DEFAULT_RUN_DIR
    interval: float = 0.5        # seconds between map refreshes
    executor: str = "auto"       # auto, gpu or cpu

    @property
    def sock_path(self) -> Path:
        return self.run_dir / "laked.sock"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "laked.pid"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "laked.log"
