"""tools/dist_test.sh, tools/slurm_train.sh and tools/slurm_test.sh hand the right command
to torch.distributed.run / srun (stand-ins record it: no process group, no cluster)."""
import os
import os.path as osp
import shlex
import subprocess

import pytest

from kw_mm.checkpoint import REPO_ROOT

RECORDER = '#!/usr/bin/env bash\nprintf "%s\\n" "PYTHONPATH=$PYTHONPATH" "$@" > "$RECORD"\n'


@pytest.fixture
def recorder(tmp_path):
    """A stand-in executable (``python`` / ``srun``) that writes its arguments to a file."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('fake-python', 'srun'):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / 'args.txt'
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', RECORD=str(record),
               PYTHON=str(bin_dir / 'fake-python'))
    for key in ('PYTHONPATH', 'NNODES', 'NODE_RANK', 'PORT', 'MASTER_ADDR', 'GPUS', 'GPUS_PER_NODE',
                'CPUS_PER_TASK', 'SRUN_ARGS'):
        env.pop(key, None)

    def run(script, *args, **extra_env):
        result = subprocess.run(['bash', osp.join(REPO_ROOT, 'tools', script), *args],
                                capture_output=True, text=True, env={**env, **extra_env},
                                timeout=60)
        lines = record.read_text().splitlines() if record.exists() else None
        return result, lines
    return run


def test_dist_test_runs_test_py_under_torch_distributed(recorder):
    result, args = recorder('dist_test.sh', 'cfg.py', 'ckpt.pth', '4', '--out', 'p.pkl',
                            NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1', PORT='29511')
    assert result.returncode == 0, result.stderr
    assert args[0] == f'PYTHONPATH={REPO_ROOT}:'
    assert args[1:] == ['-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1',
                        '--master_addr=10.0.0.1', '--nproc_per_node=4', '--master_port=29511',
                        osp.join(REPO_ROOT, 'tools', 'test.py'), 'cfg.py', 'ckpt.pth',
                        '--launcher', 'pytorch', '--out', 'p.pkl']


@pytest.mark.parametrize('script, fourth, tool_args', [
    ('slurm_train.sh', 'work_dirs/x', ['cfg.py', '--work-dir=work_dirs/x']),
    ('slurm_test.sh', 'ckpt.pth', ['cfg.py', 'ckpt.pth']),
])
def test_slurm_scripts_run_one_task_per_gpu(recorder, script, fourth, tool_args):
    result, args = recorder(script, 'gpu', 'kw', 'cfg.py', fourth, '--cfg-options', 'a=1',
                            GPUS='16', SRUN_ARGS='--qos=high --time=1:00:00', PYTHON='python3')
    assert result.returncode == 0, result.stderr
    tool = osp.join(REPO_ROOT, 'tools', script.replace('slurm_', '').replace('.sh', '.py'))
    assert args[1:] == ['-p', 'gpu', '--job-name=kw', '--gres=gpu:8', '--ntasks=16',
                        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1',
                        '--qos=high', '--time=1:00:00', 'python3', '-u', tool, *tool_args,
                        '--launcher=slurm', '--cfg-options', 'a=1']


@pytest.mark.parametrize('script, args', [
    ('dist_test.sh', ['cfg.py', 'ckpt.pth']),
    ('slurm_train.sh', ['gpu', 'kw', 'cfg.py']),
    ('slurm_test.sh', ['gpu', 'kw', 'cfg.py']),
])
def test_missing_arguments_print_the_usage(recorder, script, args):
    result, recorded = recorder(script, *args)
    assert result.returncode != 0 and recorded is None  # nothing was started
    assert f'usage: tools/{script}' in result.stderr, shlex.join(args)
