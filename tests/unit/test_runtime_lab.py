"""JupyterLab here or as a batch job: job scripts for SLURM and LSF, the tunnel line, no real scheduler."""

import io
import os
import socket
import stat
import subprocess

import dask
import pytest

from imprint.runtime.cli import main
from imprint.runtime.lab import ClusterOptions, LabJob, host_name, lab_command, run_lab, tunnel_command, user_name


def _job(tmp_path, options):
    return LabJob(options, 8890, "secret-token", tmp_path / "lab.host", tmp_path / "notebooks", log_directory=tmp_path)


def test_slurm_script_has_dask_jobqueues_header_and_starts_lab_on_loopback(tmp_path):
    from dask_jobqueue.slurm import SLURMJob

    options = ClusterOptions("slurm", queue="gpu", gpus=2, memory="32GB", cores=8, walltime="04:00:00", account="ml")
    script = _job(tmp_path, options).script()
    expected = SLURMJob(scheduler="tcp://127.0.0.1:0", name="imprint-lab", job_name="imprint-lab", queue="gpu",
                        memory="32GB", cores=8, walltime="04:00:00", account="ml", log_directory=str(tmp_path),
                        job_extra_directives=["--gres=gpu:2"]).job_header
    assert expected in script
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:2", "#SBATCH -t 04:00:00", "#SBATCH -A ml",
                 "#SBATCH --cpus-per-task=8", "#SBATCH -J imprint-lab"):
        assert line in script.splitlines(), line
    assert "--ip=127.0.0.1 --port=8890" in script and "export JUPYTER_TOKEN=secret-token" in script
    assert f'echo "$(hostname) $SLURM_JOB_ID" > {tmp_path / "lab.host"}' in script
    assert '$([ "$(id -u)" = 0 ] && echo --allow-root)' in script
    assert script.startswith("#!/usr/bin/env bash\n#SBATCH")


def test_lsf_script_has_dask_jobqueues_header(tmp_path):
    from dask_jobqueue.lsf import LSFJob

    options = ClusterOptions("lsf", queue="interactive-gpu", gpus=1, memory="16GB", walltime="02:00")
    script = _job(tmp_path, options).script()
    expected = LSFJob(scheduler="tcp://127.0.0.1:0", name="imprint-lab", job_name="imprint-lab",
                      queue="interactive-gpu", memory="16GB", cores=1, walltime="02:00", log_directory=str(tmp_path),
                      job_extra_directives=['-gpu "num=1"']).job_header
    assert expected in script
    for line in ("#BSUB -q interactive-gpu", '#BSUB -gpu "num=1"', "#BSUB -W 02:00", "#BSUB -J imprint-lab"):
        assert line in script.splitlines(), line
    assert "$LSB_JOBID" in script


def test_resources_come_from_the_cluster_profile_with_options_on_top(tmp_path):
    profile = {"jobqueue.slurm.memory": "8GB", "jobqueue.slurm.queue": "short",
               "jobqueue.slurm.job-extra-directives": ["--constraint=a100"]}
    with dask.config.set(profile):
        kwargs = ClusterOptions("slurm", gpus=1).jobqueue_kwargs()
        assert kwargs == {"cores": 1, "job_extra_directives": ["--constraint=a100", "--gres=gpu:1"]}
        script = _job(tmp_path, ClusterOptions("slurm", queue="long", gpus=1)).script()
    assert "#SBATCH -p long" in script and "#SBATCH --mem=8G" in script
    assert "#SBATCH --constraint=a100" in script and "#SBATCH --gres=gpu:1" in script


def test_missing_memory_and_bad_options_are_refused_naming_them(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"memory: no value; pass --memory .*jobqueue.lsf.memory"):
        ClusterOptions("lsf").jobqueue_kwargs()
    with pytest.raises(ValueError, match=r"gpus=-1: expected a value >= 0"):
        ClusterOptions("slurm", gpus=-1)
    assert main(["lab", "--scheduler", "slurm", "--dry-run"]) == 2
    assert "error: memory: no value" in capsys.readouterr().err


def test_user_name_without_user_in_the_environment(monkeypatch):
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    expected = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert user_name() == expected and expected
    assert tunnel_command(8888, "node7", login="login1") == \
        f"ssh -N -L 8888:127.0.0.1:8888 -J {expected}@login1 {expected}@node7"


def test_allow_root_only_as_root(monkeypatch, tmp_path):
    assert "--allow-root" in lab_command(8888, tmp_path, as_root=True)
    assert "--allow-root" not in lab_command(8888, tmp_path, as_root=False)
    out = io.StringIO()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    run_lab(8888, tmp_path, dry_run=True, out=out)
    assert "--ip=127.0.0.1" in out.getvalue() and "--allow-root" in out.getvalue()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = io.StringIO()
    run_lab(8888, tmp_path, dry_run=True, out=out)
    assert "--allow-root" not in out.getvalue()


def test_submit_waits_for_the_node_and_prints_the_two_hop_tunnel(tmp_path, monkeypatch, project):
    # a stand-in for sbatch that "starts" the job at once: it runs the script's line that reports the node
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text('#!/usr/bin/env bash\nSLURM_JOB_ID=4242 bash -c "$(grep \'^echo\' "$1")"\n'
                    'echo "Submitted batch job 4242"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("IMPRINT_ROOT", str(project))
    monkeypatch.setenv("USER", "ada")
    out = io.StringIO()
    assert run_lab(8891, options=ClusterOptions("slurm", memory="4GB"), wait=60.0, out=out) == 0
    text = out.getvalue()
    assert "submitted job 4242" in text
    assert f"ssh -N -L 8891:127.0.0.1:8891 -J ada@{host_name()} ada@{socket.gethostname()}" in text
    scripts = list((project / "_build" / "lab").glob("*.sh"))
    assert len(scripts) == 1 and stat.S_IMODE(scripts[0].stat().st_mode) == 0o600


def test_the_sweep_reads_the_same_cluster_options(monkeypatch, project):
    import imprint.runtime.sweep as sweep

    seen = {}

    def fake_client(scheduler, workers, **kwargs):
        seen.update(scheduler=scheduler, workers=workers, **kwargs)
        raise KeyboardInterrupt("stopped before submitting")

    monkeypatch.setattr(sweep, "make_client", fake_client)
    monkeypatch.setenv("IMPRINT_ROOT", str(project))
    with dask.config.set({"jobqueue.lsf.job-extra-directives": ["-R a100"]}):
        main(["sweep", "99_toy", "--grid", "n=1,2", "--scheduler", "lsf", "--memory", "8GB", "--gpus", "1",
              "--queue", "gpu", "--workers", "3"])
    assert seen == {"scheduler": "lsf", "workers": 3, "queue": "gpu", "memory": "8GB", "cores": 1,
                    "job_extra_directives": ["-R a100", '-gpu "num=1"']}
