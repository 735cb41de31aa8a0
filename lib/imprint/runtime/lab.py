"""JupyterLab for interactive work: here, or on a cluster node as a SLURM or LSF batch job.

``python -m imprint lab`` starts JupyterLab bound to 127.0.0.1 with a token (``--allow-root`` when run as
root, as in containers) and prints the SSH tunnel to paste on a laptop. With ``--scheduler slurm|lsf``
it writes a batch job that starts JupyterLab on the node, submits it, waits for the node to report its
host name through a file in ``_build/lab/`` (a shared file system, as the repository is), and prints
the two-hop tunnel (laptop -> login node -> compute node). ``--dry-run`` prints the job script instead.

The job's resources (queue, GPUs, memory, cores, wall time, account, extra directives) come from the
options, else from the cluster profile that ``imprint sweep --scheduler`` reads too: dask-jobqueue's own
configuration, ``jobqueue.slurm`` / ``jobqueue.lsf`` in ``~/.config/dask/jobqueue.yaml``. The header is
rendered by dask-jobqueue's job classes, so it reads the same as the sweep's worker jobs.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from imprint.runtime.checks import require_choice, require_int
from imprint.runtime.provenance import repo_root

SCHEDULERS = ("slurm", "lsf")


@dataclass(frozen=True)
class ClusterOptions:
    """Resources of a batch job; ``None`` leaves the value to the cluster profile (dask-jobqueue config)."""

    scheduler: str
    queue: str | None = None
    gpus: int = 0
    memory: str | None = None
    cores: int | None = None
    walltime: str | None = None
    account: str | None = None
    job_extra: tuple[str, ...] = ()

    def __post_init__(self):
        require_choice("scheduler", self.scheduler, SCHEDULERS)
        require_int("gpus", self.gpus, minimum=0)
        if self.cores is not None:
            require_int("cores", self.cores, minimum=1)

    def jobqueue_kwargs(self) -> dict:
        """Keyword arguments for dask-jobqueue's ``SLURMCluster`` / ``LSFCluster`` and their job classes.

        Values not given here are left out, so dask-jobqueue takes them from its configuration; the
        GPU request is added to the configured extra directives, not put in their place.
        """
        import dask
        import dask_jobqueue  # noqa: F401  (loads the jobqueue defaults into dask.config)

        config = dask.config.get(f"jobqueue.{self.scheduler}", default={}) or {}
        kwargs = {k: v for k, v in (("queue", self.queue), ("memory", self.memory), ("cores", self.cores),
                                    ("walltime", self.walltime)) if v is not None}
        if self.account is not None:
            kwargs["account" if self.scheduler == "slurm" else "project"] = self.account
        gpu = ([f"--gres=gpu:{self.gpus}"] if self.scheduler == "slurm" else [f'-gpu "num={self.gpus}"']) if self.gpus else []
        extra = [*(config.get("job-extra-directives") or []), *self.job_extra, *gpu]
        if extra:
            kwargs["job_extra_directives"] = extra
        if "cores" not in kwargs and config.get("cores") is None:
            kwargs["cores"] = 1
        if "memory" not in kwargs and config.get("memory") is None:
            raise ValueError(f"memory: no value; pass --memory (e.g. 32GB) or set jobqueue.{self.scheduler}.memory "
                             "in ~/.config/dask/jobqueue.yaml (the cluster profile)")
        return kwargs


def user_name() -> str:
    """The login name for the tunnel: ``$USER``/``$LOGNAME`` when set, else the password database."""
    for key in ("USER", "LOGNAME"):
        if os.environ.get(key):
            return os.environ[key]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


def host_name() -> str:
    """This machine's name as a laptop would reach it: the FQDN, unless that is only localhost."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.startswith("localhost") else fqdn


def tunnel_command(port: int, node: str, login: str | None = None, user: str | None = None) -> str:
    """``ssh -N -L port:127.0.0.1:port [-J user@login] user@node``: one hop, or two through a login node."""
    user = user or user_name()
    jump = f" -J {user}@{login}" if login else ""
    return f"ssh -N -L {port}:127.0.0.1:{port}{jump} {user}@{node}"


def lab_command(port: int, notebook_dir: Path, as_root: bool) -> list[str]:
    """JupyterLab on 127.0.0.1 only; the token comes from ``$JUPYTER_TOKEN`` (never on the command line)."""
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={notebook_dir}"]
    return cmd + (["--allow-root"] if as_root else [])


@dataclass(frozen=True)
class LabJob:
    """A rendered batch job that starts JupyterLab and writes the node's name to ``host_file``."""

    options: ClusterOptions
    port: int
    token: str
    host_file: Path
    notebook_dir: Path
    name: str = "imprint-lab"
    log_directory: Path | None = field(default=None)

    def header(self) -> str:
        """The scheduler directives, rendered by dask-jobqueue's job class."""
        from dask_jobqueue.lsf import LSFJob
        from dask_jobqueue.slurm import SLURMJob

        cls = SLURMJob if self.options.scheduler == "slurm" else LSFJob
        kwargs = self.options.jobqueue_kwargs()
        if self.log_directory is not None:
            kwargs["log_directory"] = str(self.log_directory)
        return cls(scheduler="tcp://127.0.0.1:0", name=self.name, job_name=self.name, **kwargs).job_header

    def script(self) -> str:
        job_id = "$SLURM_JOB_ID" if self.options.scheduler == "slurm" else "$LSB_JOBID"
        lab = " ".join(shlex.quote(a) for a in lab_command(self.port, self.notebook_dir, as_root=False))
        return "\n".join([
            "#!/usr/bin/env bash",
            self.header(),
            "set -euo pipefail",
            f"cd {shlex.quote(str(repo_root()))}",
            f"export JUPYTER_TOKEN={shlex.quote(self.token)}",
            f'echo "$(hostname) {job_id}" > {shlex.quote(str(self.host_file))}',
            f'exec {lab} $([ "$(id -u)" = 0 ] && echo --allow-root)',
            "",
        ])


def submit(job: LabJob, script_path: Path) -> str:
    """Write the job script (readable by its owner only: it holds the token) and submit it; the job id."""
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(job.script())
    script_path.chmod(0o600)
    if job.options.scheduler == "slurm":
        proc = subprocess.run(["sbatch", str(script_path)], capture_output=True, text=True)
    else:
        with open(script_path) as fh:
            proc = subprocess.run(["bsub"], stdin=fh, capture_output=True, text=True)
    found = re.search(r"(\d+)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"submitting {script_path} failed ({proc.returncode}): {proc.stdout}{proc.stderr}".strip())
    return found.group(1)


def wait_for_node(host_file: Path, timeout: float, poll: float = 2.0) -> str:
    """The node's host name, once the job has written it; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host_file.is_file() and host_file.read_text().strip():
            return host_file.read_text().split()[0]
        time.sleep(poll)
    raise TimeoutError(f"the job has not started after {timeout:.0f} s (no {host_file}); it may still be queued")


def new_job(options: ClusterOptions, port: int, notebook_dir: Path) -> LabJob:
    folder = repo_root() / "_build" / "lab"
    tag = secrets.token_hex(4)
    return LabJob(options, port, secrets.token_hex(24), folder / f"lab-{tag}.host", notebook_dir,
                  log_directory=folder)


def run_lab(port: int = 8888, notebook_dir: Path | None = None, options: ClusterOptions | None = None,
            dry_run: bool = False, wait: float = 3600.0, out=sys.stdout) -> int:
    """Start JupyterLab here (``options`` None) or as a batch job; print what to paste on the laptop."""
    require_int("port", port, minimum=1, maximum=65535)
    notebook_dir = notebook_dir or repo_root() / "notebooks"
    if options is None:
        cmd = lab_command(port, notebook_dir, as_root=os.geteuid() == 0)
        if dry_run:
            print(" ".join(shlex.quote(a) for a in cmd), file=out)
            return 0
        token = secrets.token_hex(24)
        print(f"On your laptop: {tunnel_command(port, host_name())}", file=out)
        print(f"then open http://127.0.0.1:{port}/lab?token={token}", file=out, flush=True)
        return subprocess.call(cmd, env=dict(os.environ, JUPYTER_TOKEN=token))
    job = new_job(options, port, notebook_dir)
    if dry_run:
        print(job.script().replace(job.token, "<token>"), file=out, end="")
        return 0
    job_id = submit(job, job.host_file.with_suffix(".sh"))
    print(f"submitted job {job_id}; waiting for its node (Ctrl-C stops waiting, not the job)", file=out, flush=True)
    node = wait_for_node(job.host_file, wait)
    print(f"On your laptop: {tunnel_command(port, node, login=host_name())}", file=out)
    print(f"then open http://127.0.0.1:{port}/lab?token={job.token}", file=out)
    return 0

