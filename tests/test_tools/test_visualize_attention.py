"""Attention maps (paper Figure 3): collection, rendering and tools/visualize_attention.py."""
import inspect
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tool_scripts import load_script
from torch import nn

from kw_mm import KWConv2d, KWLinear, set_temperature
from kw_mm.analysis import (
    NoKWLayersError,
    collect_attention_maps,
    render_attention_maps,
    save_attention_arrays,
)
from kw_mm.analysis.attention_maps import PANEL_SIZE
from kw_mm.checkpoint import REPO_ROOT
from kw_mm.layers import KernelShape, KernelWarehouse, plan_warehouse
from kw_mm.layers.partition import ZERO_CELL
from kw_mm.models.backbones import KWResNet

TOOL = osp.join(REPO_ROOT, 'tools', 'visualize_attention.py')
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'kw1x-resnet50_shapes-cls.py')
# depth 18 keeps the demo classifier small; the config, pipeline and loading are the real ones
TINY = ['--cfg-options', 'model.backbone.depth=18', 'model.head.in_channels=512']


def tiny_resnet(seed: int, budget: float = 1.0, tau: float = 0.5) -> KWResNet:
    torch.manual_seed(seed)
    model = KWResNet(18, kw_cfg=dict(budget=budget))
    set_temperature(model, tau)
    return model


@pytest.fixture(scope='module')
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'))


def rows_of(entry, layer_name):
    bounds = entry.layer_boundaries
    i = entry.layer_names.index(layer_name)
    return entry.mean[bounds[i]:bounds[i + 1]]


def test_one_map_per_warehouse_rows_in_plan_order(images):
    model = tiny_resnet(0).train()
    model.layer1.eval()
    maps = collect_attention_maps(model, [images])
    assert model.training and not model.layer1.training  # each module's mode is restored
    assert model.layer2[0].conv1.attention.norm1.training
    assert len(maps) == len(model.warehouses)
    for index, (entry, warehouse) in enumerate(zip(maps, model.warehouses)):
        plan = warehouse.plan
        assert entry.index == index
        assert entry.layer_names == [layer.kernel.name for layer in plan.layers]  # β-walk order
        assert entry.layer_mixtures == [layer.num_mixtures for layer in plan.layers]
        assert entry.mean.shape == (sum(entry.layer_mixtures), warehouse.num_cells)
        assert entry.beta.shape == entry.mean.shape and entry.num_samples == len(images)
        assert entry.beta_cell.tolist() == [c for layer in plan.layers for c in layer.beta]
    # warehouse 0 is shared across the stage boundary (layer2.0's first conv draws from it)
    assert 'layer2.0.conv1' in maps[0].layer_names


def test_the_mean_is_over_samples_whatever_the_batching(images):
    model = tiny_resnet(0).eval()
    layer = model.layer2[0].conv1
    seen = []
    handle = layer.attention.register_forward_hook(lambda m, i, alpha: seen.append(alpha))
    with torch.no_grad():
        model(images)
    handle.remove()
    expected = seen[0].double().mean(0).numpy()
    maps = collect_attention_maps(model, [images[:2], images[2:]])  # uneven batches
    # float32 attentions: batches of another size round differently
    np.testing.assert_allclose(rows_of(maps[0], 'layer2.0.conv1'), expected, rtol=1e-5,
                               atol=1e-7)
    assert maps[0].num_samples == len(images)


@pytest.mark.parametrize('budget', [1.0, 0.5])
def test_caf_maps_centre_on_beta(images, budget):
    # τ = 1: α = β exactly, whatever the input
    maps = collect_attention_maps(tiny_resnet(0, budget, tau=1.0), [images])
    for entry in maps:
        np.testing.assert_array_equal(entry.mean, entry.beta)
    # τ > 1/2: CAF's term is at most (1 − τ) in absolute value per row, so every
    # sample's largest attention stays on the β cell, and so does the mean
    maps = collect_attention_maps(tiny_resnet(0, budget, tau=0.6), [images])
    for entry in maps:
        with_cell = entry.beta_cell != ZERO_CELL
        assert with_cell.any()
        np.testing.assert_array_equal(entry.mean[with_cell].argmax(1),
                                      entry.beta_cell[with_cell])
        assert (entry.mean < 0).any()  # CAF attentions are signed
    if budget < 1:
        assert any((entry.beta_cell == ZERO_CELL).any() for entry in maps)


def test_png_size_arrays_and_differences_between_checkpoints(tmp_path, images):
    maps = {}
    for seed in (0, 1):
        torch.save(tiny_resnet(seed).state_dict(), tmp_path / f'seed{seed}.pth')
        model = tiny_resnet(2)  # the weights come from the checkpoint
        model.load_state_dict(torch.load(tmp_path / f'seed{seed}.pth', weights_only=True))
        maps[seed] = collect_attention_maps(model, [images])
    expected = (round(2 * PANEL_SIZE[0] * 25), round(2 * PANEL_SIZE[1] * 25))  # 2×2 panels
    pixels = []
    for seed in (0, 1, 0):
        out = tmp_path / f'{len(pixels)}.png'
        assert render_attention_maps(maps[seed], out, title='tiny', dpi=25) == expected
        with Image.open(out) as image:
            assert image.size == expected
        pixels.append(png_pixels(out))
    np.testing.assert_array_equal(pixels[0], pixels[2])  # deterministic: a difference is real
    assert not np.array_equal(pixels[0], pixels[1])
    assert not np.allclose(maps[0][0].mean, maps[1][0].mean)
    maps_a = maps[0]

    save_attention_arrays(maps_a, tmp_path / 'maps.npz')
    with np.load(tmp_path / 'maps.npz') as arrays:  # no pickle needed
        assert int(arrays['num_warehouses']) == len(maps_a)
        for entry in maps_a:
            prefix = f'warehouse{entry.index}_'
            np.testing.assert_array_equal(arrays[prefix + 'mean'], entry.mean)
            assert arrays[prefix + 'layer_names'].tolist() == entry.layer_names
            assert arrays[prefix + 'layer_mixtures'].tolist() == entry.layer_mixtures


def test_private_warehouse_of_a_kw_linear_head_is_its_own_map(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(KWConv2d(3, 8, 3, padding=1, budget=2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), KWLinear(8, 5, budget=1))
    set_temperature(model, 0.5)
    maps = collect_attention_maps(model, [torch.randn(3, 3, 8, 8)])
    assert [entry.layer_names for entry in maps] == [['0'], ['3']]
    for entry, layer in zip(maps, (model[0], model[3])):
        assert entry.mean.shape == (layer.layer_plan.num_mixtures, layer.kw_warehouse.num_cells)
    size = render_attention_maps(maps, tmp_path / 'two.png', dpi=30)
    assert size == (round(2 * PANEL_SIZE[0] * 30), round(PANEL_SIZE[1] * 30))  # 2 panels, 1 row
    with Image.open(tmp_path / 'two.png') as image:
        assert image.size == size


@pytest.mark.skipif('private' not in inspect.signature(plan_warehouse).parameters,
                    reason='warehouses without sharing are not available')
def test_warehouse_without_sharing_maps_each_mixture_to_its_own_cells():
    plan = plan_warehouse([KernelShape('conv', 8, 4, (3, 3))], 2, private=True)
    warehouse = KernelWarehouse(plan)
    model = nn.ModuleDict(dict(warehouse=warehouse, conv=KWConv2d(4, 8, 3, padding=1,
                                                                  warehouse=warehouse,
                                                                  name='conv')))
    set_temperature(model, 0.6)
    (entry,) = collect_attention_maps(model, [torch.randn(2, 4, 6, 6)],
                                      forward=lambda x: model['conv'](x))
    m = plan.layers[0].num_mixtures
    assert entry.mean.shape == (m, 2 * m)
    for i in range(m):
        outside = np.delete(entry.mean[i], [2 * i, 2 * i + 1])
        assert not outside.any()
    np.testing.assert_array_equal(entry.mean.argmax(1), 2 * np.arange(m))
    np.testing.assert_array_equal(entry.beta_cell, 2 * np.arange(m))


def test_models_and_runs_without_attention_are_refused():
    with pytest.raises(NoKWLayersError, match='no KernelWarehouse layer'):
        collect_attention_maps(nn.Sequential(nn.Conv2d(3, 8, 3)), [torch.randn(1, 3, 8, 8)])
    with pytest.raises(RuntimeError, match=r"no sample reached the KW layer\(s\) \['0'\]"):
        collect_attention_maps(nn.Sequential(KWConv2d(3, 8, 3)), [])
    with pytest.raises(ValueError, match='dpi must be a positive int'):
        render_attention_maps([object()], 'unused.png', dpi=0)


# --- the tool ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tool():
    return load_script(TOOL)


def test_tool_on_the_demo_data(tmp_path, tool):
    # a checkpoint with τ = 0.5 of the tiny demo classifier (its config starts at τ = 1)
    cfg = tool.load_config(DEMO_CONFIG, {'model.backbone.depth': 18,
                                         'model.head.in_channels': 512})
    torch.manual_seed(0)
    model = tool.build_model(cfg)
    set_temperature(model, 0.5)
    checkpoint = tmp_path / 'tau05.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)

    common = ['--data', 'demo', '--num-images', '3', '--batch-size', '2', '--dpi', '20']
    result = subprocess.run(
        [sys.executable, TOOL, DEMO_CONFIG, str(checkpoint), *common, '--out',
         str(tmp_path / 'ckpt.png'), '--save-arrays', str(tmp_path / 'ckpt.npz'), *TINY],
        capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'tau=0.5' in result.stdout
    # mmengine's progress bar, advanced per batch (2 + 1 images)
    assert ' 2/3, ' in result.stdout and ' 3/3, ' in result.stdout
    expected = (round(2 * PANEL_SIZE[0] * 20), round(2 * PANEL_SIZE[1] * 20))  # 4 warehouses
    with Image.open(tmp_path / 'ckpt.png') as image:
        assert image.size == expected
    with np.load(tmp_path / 'ckpt.npz') as arrays:
        assert int(arrays['num_warehouses']) == 4
        assert int(arrays['warehouse0_num_samples']) == 3
        assert arrays['warehouse0_layer_names'][0] == 'backbone.layer1.0.conv1'
        # the checkpoint's τ = 0.5 was used: the map is no longer β
        assert not np.allclose(arrays['warehouse0_mean'], arrays['warehouse0_beta'])

    # the config's initialisation (τ = 1): exactly β, and a different image
    tool.main([DEMO_CONFIG, 'none', *common, '--out', str(tmp_path / 'init.png'),
               '--save-arrays', str(tmp_path / 'init.npz'), *TINY])
    with np.load(tmp_path / 'init.npz') as arrays:
        np.testing.assert_array_equal(arrays['warehouse0_mean'], arrays['warehouse0_beta'])
    assert not np.array_equal(png_pixels(tmp_path / 'init.png'), png_pixels(tmp_path / 'ckpt.png'))


def test_tool_errors_name_the_problem(tmp_path, tool):
    with pytest.raises(FileNotFoundError, match='config not found: .*missing.py'):
        tool.main([str(tmp_path / 'missing.py'), 'none'])
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth.*'none'"):
        tool.main([DEMO_CONFIG, str(tmp_path / 'nope.pth'), *TINY])
    with pytest.raises(FileNotFoundError, match='--data .*folder not found: .*no_images'):
        tool.main([DEMO_CONFIG, 'none', '--data', str(tmp_path / 'no_images'), *TINY])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='holds no image'):
        tool.main([DEMO_CONFIG, 'none', '--data', str(tmp_path / 'empty'), *TINY])
    with pytest.raises(NoKWLayersError, match='no KernelWarehouse layer'):
        tool.main([DEMO_CONFIG, 'none', '--cfg-options', 'model.backbone.kw_cfg=None'])


def test_config_without_a_test_pipeline_is_refused_by_name(tool):
    from mmengine.config import Config
    cfg = Config(dict(model=dict(type='KWResNet', depth=18, kw_cfg=dict(budget=1))))
    with pytest.raises(tool.MissingPipelineError, match='the config has no test pipeline'):
        tool.inference_pipeline(cfg)
