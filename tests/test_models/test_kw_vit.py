"""KWVisionTransformer (DeiT with KW, paper Table 11): parameter counts, the plain
model against mmpretrain's VisionTransformer, τ = 1, training, EMA, state dicts,
export, the attention-map tool and tools/train.py."""
import copy
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope
from tool_scripts import load_script

from kw_mm import KWLinear, set_temperature
from kw_mm.checkpoint import REPO_ROOT
from kw_mm.layers.partition import ZERO_CELL
from kw_mm.models.backbones import KWVisionTransformer

CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'kw_deit')
#: config → the paper's Params (millions) and top-1 (Table 11), and how far the
#: layout of configs/kw_deit/README.md is from those Params at most (millions)
TABLE_11 = {
    'deit-tiny_4xb256_in1k': (5.72, 72.13, 0.01),
    'kw1x-deit-tiny_4xb256_in1k': (6.39, 73.56, 0.01),
    'kw4x-deit-tiny_4xb256_in1k': (20.44, 76.51, 0.47),
    'deit-small_4xb256_in1k': (22.06, 79.78, 0.01),
    'kw3d4x-deit-small_4xb256_in1k': (19.23, 79.94, 0.36),
    'kw1x-deit-small_4xb256_in1k': (24.36, 80.63, 0.01),
}
#: a width-reduced DeiT: 4 blocks of 48 channels, 32×32 images in 8×8 patches
TINY = dict(arch=dict(embed_dims=48, num_layers=4, num_heads=3, feedforward_channels=192),
            img_size=32, patch_size=8)


def tiny_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {**TINY, 'kw_cfg': dict(budget=1.0), 'blocks_per_warehouse': 2, **kwargs}
    return KWVisionTransformer(**kwargs)


def kw_layers(model):
    return [m for m in model.modules() if isinstance(m, KWLinear)]


@pytest.fixture(scope='module')
def metafile():
    with open(osp.join(CONFIG_DIR, 'metafile.yml')) as f:
        # keyed by config; the plain baselines' names say kw-mm (mmpretrain owns theirs)
        return {osp.splitext(osp.basename(m['Config']))[0]: m
                for m in yaml.safe_load(f)['Models']}


@pytest.mark.parametrize('name', sorted(TABLE_11))
def test_table11_parameter_counts_and_metafile(name, metafile):
    cfg = Config.fromfile(osp.join(CONFIG_DIR, f'{name}.py'))
    import kw_mm  # noqa: F401
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    paper_params, paper_top1, tolerance = TABLE_11[name]
    assert abs(params / 1e6 - paper_params) <= tolerance, params
    entry = metafile[name]
    assert entry['Metadata']['Parameters'] == params
    assert entry['Config'] == f'configs/kw_deit/{name}.py'
    assert entry['Results'] == [dict(Task='Image Classification', Dataset='ImageNet-1k',
                                     Metrics={'Top 1 Accuracy': paper_top1})]
    assert 'Weights' not in entry


def test_metafile_lists_every_config(metafile):
    configs = {osp.splitext(n)[0] for n in os.listdir(CONFIG_DIR) if n.endswith('.py')}
    assert set(metafile) == configs == set(TABLE_11)


def test_plain_is_mmpretrains_vision_transformer():
    from mmpretrain.models import VisionTransformer
    torch.manual_seed(0)
    ref = VisionTransformer('deit-tiny', img_size=32, drop_path_rate=0.1)
    ours = KWVisionTransformer('deit-tiny', kw_cfg=None, img_size=32, drop_path_rate=0.1)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    with torch.no_grad():  # random everywhere (the embeddings start at 0, the norms at 1)
        for p in ref.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)
        # a 48×48 input: the position embedding is resized as mmpretrain does
        x = torch.randn(1, 3, 48, 48)
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)


def assigned_weight(layer):
    """The weight a KWLinear assembles at τ = 1: every mixture its β cell."""
    plan, wh = layer.layer_plan, layer.kw_warehouse
    co, ci = wh.plan.cell_out, wh.plan.cell_in
    weight = torch.zeros(layer.out_features, layer.in_features)
    for i, cell in enumerate(plan.beta):
        o, c = divmod(i, plan.in_groups)
        if cell != ZERO_CELL:
            weight[o * co:(o + 1) * co, c * ci:(c + 1) * ci] = wh.cells[cell].reshape(co, ci)
    return weight


@pytest.mark.parametrize('budget', [1.0, 4.0])
def test_tau_one_is_the_plain_model_with_the_assigned_cells(budget):
    """At τ = 1 every mixture is its β cell: the KW model computes what a plain
    VisionTransformer with those weights (value rows of qkv included) computes."""
    from mmpretrain.models import VisionTransformer
    model = tiny_vit(kw_cfg=dict(budget=budget))
    set_temperature(model, 1.0)
    ref = VisionTransformer(**TINY)
    state = {k: v for k, v in model.state_dict().items() if k in ref.state_dict()}
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            attn, ffn, p = block.attn, block.ffn, f'layers.{i}.'
            state[p + 'attn.qkv.weight'] = torch.cat([attn.qk.weight, assigned_weight(attn.v)])
            state[p + 'attn.qkv.bias'] = torch.cat([attn.qk.bias, attn.v.bias])
            for name, layer in (('attn.proj', attn.proj), ('ffn.layers.0.0', ffn.layers[0][0]),
                                ('ffn.layers.1', ffn.layers[1])):
                state[p + name + '.weight'] = (assigned_weight(layer)
                                               if isinstance(layer, KWLinear) else layer.weight)
                state[p + name + '.bias'] = layer.bias
            # the β walk: consecutive cells, stepping by int(b), shared by two blocks
            first = attn.v.layer_plan.beta[0]
            assert first == (i % 2) * attn.v.kw_warehouse.num_cells // 2
    ref.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('batch', [1, 2])
def test_train_step_reaches_every_parameter(batch):
    model = tiny_vit().train()
    set_temperature(model, 0.5)
    out = model(torch.randn(batch, 3, 32, 32))[0]
    assert out.shape == (batch, 48)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    names = {n for n, _ in model.named_parameters()}
    assert 'layers.0.attn.qk.weight' in names and 'layers.0.attn.qkv.weight' not in names
    assert {type(m).__name__ for m in (model.layers[0].attn.v, model.layers[0].attn.proj,
                                       model.layers[0].ffn.layers[0][0],
                                       model.layers[0].ffn.layers[1])} == {'KWLinear'}


def test_ema_copy_and_state_dict_round_trip():
    from mmengine.model import ExponentialMovingAverage
    model = tiny_vit().eval()
    set_temperature(model, 0.25)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)[0]
    ema = ExponentialMovingAverage(model, momentum=0.5)  # deep-copies the model
    clone = ema.module
    for layer, copied in zip(kw_layers(model), kw_layers(clone)):
        assert copied.kw_warehouse is not layer.kw_warehouse
        assert any(copied.kw_warehouse is w for w in clone.warehouses)
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[0], expected)
    ema.update_parameters(model)  # mmengine's first update copies
    with torch.no_grad():
        for w in model.warehouses:  # the live model moves; the average follows half-way
            w.cells.add_(1.0)
    ema.update_parameters(model)
    for w, averaged in zip(model.warehouses, clone.warehouses):
        torch.testing.assert_close(averaged.cells, w.cells - 0.5)
    fresh = tiny_vit(seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.layers[3].ffn.layers[1].attention.temperature) == 0.25
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], model(x)[0])
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x)[0], model(x)[0])
    # another image size: the position embedding is resized before the variant check
    larger = tiny_vit(img_size=48).eval()
    larger.load_state_dict(model.state_dict())
    torch.testing.assert_close(larger.warehouses[0].cells, model.warehouses[0].cells)
    assert larger.pos_embed.shape == (1, 37, 48)


def test_layout_warehouses_and_frozen_stages():
    model = tiny_vit(blocks_per_warehouse=3)
    assert KWVisionTransformer.warehouse_names(TINY['arch'], 3) == ['layers[0:3]', 'layers[3:4]']
    assert [len(w.plan.layers) for w in model.warehouses] == [12, 4]
    assert model.layers[3].attn.v.kw_warehouse is model.warehouses[1]
    plain_proj = tiny_vit(kw_proj=False)
    assert type(plain_proj.layers[0].attn.proj) is torch.nn.Linear
    frozen = tiny_vit(frozen_stages=2).train()
    assert not frozen.layers[1].training and frozen.layers[2].training
    assert not frozen.warehouses[0].cells.requires_grad and frozen.warehouses[1].cells.requires_grad
    assert not frozen.pos_embed.requires_grad


@pytest.mark.parametrize('kwargs, match', [
    (dict(blocks_per_warehouse=0), 'blocks_per_warehouse must be a positive int, got 0'),
    (dict(kw_proj='yes'), "kw_proj must be True or False, got 'yes'"),
    (dict(kw_warehouses={'layers[0:9]': dict(budget=0.5)}),
     r"unknown warehouse 'layers\[0:9\]'; this layout has \['layers\[0:2\]', 'layers\[2:4\]'\]"),
    (dict(arch='deit-huge'), "arch must be one of .* got 'deit-huge'"),
    (dict(arch=dict(embed_dims=48, num_layers=2, num_heads=5, feedforward_channels=96)),
     'embed_dims=48 must be divisible by num_heads=5'),
    (dict(frozen_stages=5), r'frozen_stages must be an int in \[-1, 4\]'),
    (dict(kw_cfg=dict(budget=1.0, sharing='blocks')), 'kw_cfg.sharing must be one of'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit(**kwargs)


def test_onnx_export_with_a_dynamic_batch(tmp_path):
    pytest.importorskip('onnxscript')
    pytest.importorskip('onnxruntime')
    from kw_mm.export import BackboneForExport, export_and_verify
    model = tiny_vit(arch=dict(embed_dims=48, num_layers=1, num_heads=3,
                               feedforward_channels=96))
    set_temperature(model, 0.5)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the attentions from one batch
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = 1.0
        model(torch.randn(4, 3, 32, 32))
    report = export_and_verify(BackboneForExport(model).eval(), str(tmp_path / 'vit.onnx'),
                               (3, 32, 32))
    assert sorted(report.max_abs_diff) == [1, 3]
    for batch in (1, 3):
        assert report.max_abs_reference[batch] > 0.1
        assert report.max_abs_diff[batch] <= 1e-4 * report.max_abs_reference[batch]


DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'kw1x-deit-tiny_shapes-cls.py')


def tiny_demo_config(folder):
    """The demo config on a 2-block, 48-channel DeiT (its tools, pipeline and hooks are
    the real ones)."""
    path = folder / 'tiny_deit_demo.py'
    path.write_text(f"_base_ = {DEMO_CONFIG!r}\n"
                    "model = dict(backbone=dict(arch=dict(_delete_=True, embed_dims=48, "
                    "num_layers=2, num_heads=3, feedforward_channels=192)), "
                    "head=dict(in_channels=48))\n")
    return str(path)


def load_tool(name):
    return load_script(osp.join(REPO_ROOT, 'tools', f'{name}.py'))


def test_visualize_attention_tool_maps_the_kw_linear_layers(tmp_path):
    load_tool('visualize_attention').main([
        tiny_demo_config(tmp_path), 'none', '--data', 'demo', '--num-images', '2', '--dpi', '20',
        '--out', str(tmp_path / 'maps.png'), '--save-arrays', str(tmp_path / 'maps.npz')])
    with np.load(tmp_path / 'maps.npz') as arrays:
        assert int(arrays['num_warehouses']) == 1  # both blocks share the first warehouse
        assert list(arrays['warehouse0_layer_names']) == [
            f'backbone.layers.{i}.{name}' for i in (0, 1)
            for name in ('attn.v', 'attn.proj', 'ffn.layers.0.0', 'ffn.layers.1')]
        # the config's τ = 1: the maps are β
        np.testing.assert_array_equal(arrays['warehouse0_mean'], arrays['warehouse0_beta'])
    assert (tmp_path / 'maps.png').stat().st_size > 0


def test_train_tool_runs_an_epoch_of_the_demo_data(tmp_path):
    from kw_mm.demo.shapes import make_shapes_classification
    root = make_shapes_classification(str(tmp_path / 'shapes'), num_train=6, num_val=3, size=32)
    work = tmp_path / 'work'
    load_tool('train').main([
        tiny_demo_config(tmp_path), '--work-dir', str(work), '--cfg-options',
        f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}', 'train_dataloader.batch_size=3',
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1'])
    scalars = [json.loads(line) for path in work.glob('*/vis_data/scalars.json')
               for line in path.read_text().splitlines()]
    assert any('accuracy/top1' in row for row in scalars), scalars
    state = torch.load(work / 'epoch_1.pth', map_location='cpu', weights_only=False)['state_dict']
    assert 'backbone.warehouses.0.cells' in state and 'backbone.layers.1.attn.qk.weight' in state
    # τ fell over the 1-epoch schedule: 1 at iteration 0, 0.5 at iteration 1 of 2
    assert float(state['backbone.layers.0.attn.v.attention.temperature']) == 0.5
