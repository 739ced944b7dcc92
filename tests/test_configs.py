"""Every config under configs/ loads and builds its model (on the meta device)."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from kw_mm.convert import REPO_ROOT

CONFIGS = sorted(
    p for p in glob.glob(osp.join(REPO_ROOT, 'configs', '**', '*.py'), recursive=True)
    if '/_base_/' not in p)


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.relpath(p, REPO_ROOT) for p in CONFIGS])
def test_config_builds(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports['imports'] == ['kw_mm']
    scope = cfg.get('default_scope')
    assert scope in ('mmdet', 'mmpretrain')
    import kw_mm  # noqa: F401
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if scope == 'mmpretrain':  # the whole classifier runs (shapes only, on the meta device)
        model.eval()
        logits = model(torch.empty(2, 3, 64, 64, device='meta'), mode='tensor')
        assert logits.shape == (2, cfg.model.head.num_classes)
    kw = cfg.model.backbone.get('kw_cfg', 'absent')
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    if kw:  # a KW model: its schedule drives tau
        assert ('KWTemperatureHook' in hooks) != ('KWFinetuneHook' in hooks), hooks
    else:
        assert not {'KWTemperatureHook', 'KWFinetuneHook'} & set(hooks)
