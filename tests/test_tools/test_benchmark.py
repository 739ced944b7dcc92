"""tools/benchmark.py end to end on tiny settings (batch 1, one repetition)."""
import json
import os.path as osp
import subprocess
import sys

from kw_mm.convert import REPO_ROOT

TOOL = osp.join(REPO_ROOT, 'tools', 'benchmark.py')


def test_suite_pairs_each_measured_and_tabled(tmp_path):
    out, table = tmp_path / 'rows.json', tmp_path / 'table.md'
    result = subprocess.run(
        [sys.executable, TOOL, '--suite', 'resnet18,mobilenet_v2', '--inputs', 'cls',
         '--reps', '1', '--warmup', '0', '--cls-batch', '1', '--no-memory',
         '--json', str(out), '--markdown', str(table)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert [(r['pair'], r['mode']) for r in rows] == [
        ('resnet18', 'infer'), ('resnet18', 'train'),
        ('mobilenet_v2', 'infer'), ('mobilenet_v2', 'train')]
    for row in rows:
        assert row['input'] == 'cls' and row['batch'] == 1
        assert row['a_median_s'] > 0 and row['b_median_s'] > 0
        assert abs(row['ratio'] - row['b_median_s'] / row['a_median_s']) < 1e-9
        assert 'kw1x' in row['a'] and 'kw' not in osp.basename(row['b'])
    markdown = table.read_text()
    assert markdown.count('| resnet18 |') == 2 and markdown.count('| mobilenet_v2 |') == 2
    # the parent prints every pair's rows as they come
    assert result.stdout.count('| resnet18 | cls b1 |') == 2
    assert result.stdout.count('| mobilenet_v2 | cls b1 |') == 2
