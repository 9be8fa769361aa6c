"""Launch a worker script on N CPU ranks (gloo) with torchrun, with every guard against hangs.

Each launch gets a free port, OMP_NUM_THREADS=1, ACCELERATE_USE_CPU=1 (without it, torchrun + a plain Accelerator()
on a machine without CUDA gives N independent world-size-1 runs), a short process-group timeout passed to the
workers (SOFTPROMPT_PG_TIMEOUT) and a wall-clock timeout after which the whole process group is killed, so a dead
or hung rank makes the test fail instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncode: int
    output: str
    wall_s: float
    out_dir: Path
    timed_out: bool = False
    ranks: list[dict] = field(default_factory=list)

    def check(self) -> Launch:
        assert not self.timed_out, f"ranks still running after the timeout, killed:\n{self.output[-6000:]}"
        assert self.returncode == 0, f"exit {self.returncode}:\n{self.output[-6000:]}"
        return self


def worker_env(pg_timeout_s: int = 60, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        ACCELERATE_USE_CPU="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        SOFTPROMPT_PG_TIMEOUT=str(pg_timeout_s),
        PYTHONPATH=os.pathsep.join([str(WORKERS), str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.update(extra or {})
    return env


def _run(cmd: list[str], out_dir: Path, timeout_s: float, env: dict, nproc: int) -> Launch:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "launch.log"
    start = time.monotonic()
    timed_out = False
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out_dir, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started: our own session
            returncode = proc.wait()
    wall = time.monotonic() - start
    ranks = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else {})
    return Launch(returncode, log.read_text(errors="replace"), wall, out_dir, timed_out, ranks)


def launch(
    script: str,
    *args: str,
    out_dir: Path,
    nproc: int = 2,
    timeout_s: float = 240,
    pg_timeout_s: int = 60,
    env: dict | None = None,
) -> Launch:
    """Run `workers/<script>` on `nproc` ranks; each rank writes `<out_dir>/rank<r>.json`."""
    return launch_file(
        WORKERS / script,
        "--out",
        str(out_dir),
        *args,
        out_dir=out_dir,
        nproc=nproc,
        timeout_s=timeout_s,
        pg_timeout_s=pg_timeout_s,
        env=env,
    )


def launch_file(
    path: Path,
    *args: str,
    out_dir: Path,
    nproc: int = 2,
    timeout_s: float = 240,
    pg_timeout_s: int = 60,
    env: dict | None = None,
) -> Launch:
    """Run any script on `nproc` ranks under torchrun (cwd: `out_dir`, log: `<out_dir>/launch.log`).
    A port taken by someone else between `free_port()` and torchrun's bind gets one retry on a new port."""
    for attempt in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--nnodes=1",
            "--max_restarts=0",
            "--monitor_interval=0.5",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(path),
            *args,
        ]
        result = _run(cmd, out_dir, timeout_s, worker_env(pg_timeout_s, env), nproc)
        if result.returncode == 0 or "Address already in use" not in result.output or attempt:
            return result
    return result


def run_single(script: str, *args: str, out_dir: Path, timeout_s: float = 120, env: dict | None = None) -> Launch:
    """Run `workers/<script>` as one plain process (the single-process reference)."""
    cmd = [sys.executable, str(WORKERS / script), "--out", str(out_dir), *args]
    return _run(cmd, out_dir, timeout_s, worker_env(extra=env), 1)
