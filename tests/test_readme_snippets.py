"""The README's code: every block marked ``<!-- snippet: config -->`` or
``<!-- snippet: python -->`` runs as written.

A config snippet is written to the file its first line names (``# my_config.py: ...``), loaded
with mmengine and its model built (on the meta device) and its hooks built. A python snippet
runs in a temporary folder holding the files it names: random-weight checkpoints of the configs
they stand for and a small image (``conftest.ZooFiles``).
"""
import contextlib
import io
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config

from kw_mm.apis import build_from_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
README = osp.join(REPO, 'README.md')
SNIPPET = re.compile(r'^<!-- snippet: (\w+) -->\n```python\n(.*?)^```', re.M | re.S)


def read_readme():
    with open(README, encoding='utf-8') as f:
        return f.read()


def snippets():
    return [(kind, code) for kind, code in SNIPPET.findall(read_readme())]


SNIPPETS = snippets()


def snippet_id(snippet):
    kind, code = snippet
    return f'{kind}-{code.splitlines()[0][:40]}'


def test_the_readme_has_the_snippets_users_are_pointed_to():
    kinds = [kind for kind, _ in SNIPPETS]
    assert set(kinds) == {'config', 'python'}, kinds
    text = '\n'.join(code for _, code in SNIPPETS)
    for needle in ("custom_imports = dict(imports=['kw_mm']", "type='KWResNet'",
                   "dict(type='KWTemperatureHook'", "dict(type='KWFinetuneHook')",
                   "_base_ = 'kw_mm::", 'get_model(', 'ImageClassificationInferencer(',
                   'DetInferencer(', 'list_models('):
        assert needle in text, needle
    # every python block of the README's "from Python" section is marked for testing
    section = read_readme().split('## Use KW in your own config / from Python')[1]
    section = section.split('\n## ')[0]
    assert section.count('```python') == len(SNIPPETS)


def test_the_readme_cites_the_paper_and_the_authors_release():
    text = read_readme()
    assert 'https://arxiv.org/abs/2406.07879' in text
    bibtex = re.search(r'```bibtex\n(.*?)```', text, re.S).group(1)
    assert bibtex.startswith('@inproceedings{li2024kernelwarehouse,')
    for field in ('title     = {KernelWarehouse: Rethinking the Design of Dynamic Convolution}',
                  'author    = {Li, Chao and Yao, Anbang}', 'year      = {2024}'):
        assert field in bibtex
    assert '<https://github.com/OSVAI/KernelWarehouse>' in text
    assert 'tools/convert_official_kw.py' in text


@pytest.mark.parametrize('snippet', [s for s in SNIPPETS if s[0] == 'config'], ids=snippet_id)
def test_config_snippet_builds(snippet, tmp_path, fresh_default_scope):
    from mmengine.registry import HOOKS
    code = snippet[1]
    name = re.match(r'# (\S+\.py): ', code).group(1)
    path = tmp_path / name
    path.write_text(code)
    cfg = Config.fromfile(str(path))
    model = build_from_config(str(path), device='meta')
    assert type(model.backbone).__name__.startswith('KW')
    # backbone and neck fit together (shapes only, on the meta device; FPN checks its inputs)
    features = model.extract_feat(torch.empty(1, 3, 64, 64, device='meta'))
    assert all(f.shape[0] == 1 for f in features)
    for hook in cfg.get('custom_hooks', []):
        HOOKS.build(dict(hook))


@pytest.mark.parametrize('snippet', [s for s in SNIPPETS if s[0] == 'python'], ids=snippet_id)
def test_python_snippet_runs(snippet, zoo_files, tmp_path, monkeypatch,
                             fresh_default_scope):
    code = snippet[1]
    for name in [*zoo_files.CHECKPOINTS, zoo_files.IMAGE]:
        if name in code:
            (tmp_path / name).symlink_to(zoo_files.path(name))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f'{README}:snippet', 'exec'), {'__name__': '__readme__'})
    assert printed.getvalue().strip(), 'a README snippet shows its result with print()'
