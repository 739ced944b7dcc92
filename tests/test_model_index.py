"""kw_mm's model index: every config listed once, registered with mmpretrain's ModelHub, and
mmpretrain's model API (list_models, get_model, ImageClassificationInferencer) by name."""
import functools
import glob
import os.path as osp
import re

import numpy as np
import pytest
import torch
import yaml
from mmengine.config import Config

import kw_mm
from kw_mm.utils import model_zoo

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TITLE = 'KernelWarehouse: Rethinking the Design of Dynamic Convolution'
PAPER_URL = 'https://arxiv.org/abs/2406.07879'


@functools.lru_cache(maxsize=None)
def read_yaml(path):
    """The parsed file (cached: callers only read it)."""
    with open(path) as f:
        return yaml.safe_load(f)


def metafiles():
    return sorted(osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'configs', '*',
                                                                    'metafile.yml')))


def indexed_configs():
    """Every classification and detection config of the zoo: configs/<folder>/**.py, except
    configs/demo/, the _base_ folders and the top-level entry points (configs/*.py)."""
    found = set()
    for path in glob.glob(osp.join(REPO, 'configs', '*', '**', '*.py'), recursive=True):
        rel = osp.relpath(path, REPO)
        if rel.startswith('configs/demo/') or '/_base_/' in rel:
            continue
        found.add(rel)
    return found


def index_entries():
    """(metafile, model entry) for every model of every metafile."""
    return [(meta, model) for meta in metafiles()
            for model in read_yaml(osp.join(REPO, meta)).get('Models') or []]


@pytest.fixture(scope='module')
def mmpretrain_models():
    """mmpretrain's own models, name → metainfo: ModelHub adds them on first use of the model
    API (this fails if a kw_mm name is taken), after kw_mm's, which `import kw_mm` added."""
    from mmpretrain.apis import ModelHub
    ModelHub._register_mmpretrain_models()
    ours = osp.join(REPO, 'configs') + osp.sep
    return {name: model for name, model in ModelHub._models_dict.items()
            if not str(model.config).startswith(ours)}


def test_the_index_imports_every_config_folders_metafile():
    index = read_yaml(osp.join(REPO, 'model-index.yml'))
    assert set(index) == {'Import'}
    # listed one by one: mmengine reads these paths literally for `kw_mm::` bases
    assert sorted(index['Import']) == metafiles()
    assert {'configs/kw_resnet/metafile.yml', 'configs/kw_mobilenet_v2/metafile.yml',
            'configs/kw_convnext/metafile.yml', 'configs/mask_rcnn/metafile.yml'} <= set(
                index['Import'])


def test_every_config_is_in_exactly_one_metafile(mmpretrain_models):
    mmpretrain_names = set(mmpretrain_models)
    entries = index_entries()
    listed = [model['Config'] for _, model in entries]
    twice = sorted({c for c in listed if listed.count(c) > 1})
    assert not twice, f'configs listed more than once: {twice}'
    missing = sorted(indexed_configs() - set(listed))
    assert not missing, f'configs in no metafile: {missing}'
    absent = sorted(c for c in listed if not osp.isfile(osp.join(REPO, c)))
    assert not absent, f'Config paths that do not exist: {absent}'
    for meta, model in entries:
        folder = osp.dirname(meta)
        assert model['Config'].startswith(folder + '/'), (meta, model['Config'])
        stem = osp.basename(model['Config'])[:-len('.py')]
        # the config's name, unless mmpretrain has a model of that name (ModelHub refuses a
        # second one, and then would not list any model)
        if stem in mmpretrain_names:
            head, _, tail = stem.partition('_')
            assert model['Name'] == f'{head}_kw-mm_{tail}', (
                f'{meta}: mmpretrain has a model named {stem}; name this entry '
                f'{head}_kw-mm_{tail}')
        else:
            assert model['Name'] == stem, f'{meta}: name the entry of {model["Config"]} {stem}'
        assert model['Name'] == model['Name'].lower(), model['Name']
        assert model['Name'].lower() not in mmpretrain_names, model['Name']
        assert isinstance(model['Metadata']['Parameters'], int), model['Name']
        assert 'Weights' not in model, f'{model["Name"]}: kw_mm hosts no checkpoints'


#: the collections of the methods KW is compared with cite their own papers
OTHER_METHODS = {'ODConv', 'CondConv', 'DY-Conv'}


def test_collections_cite_the_paper():
    for meta in metafiles():
        data = read_yaml(osp.join(REPO, meta))
        collections = {c['Name']: c for c in data['Collections']}
        for model in data['Models']:
            name = model['In Collection']
            paper = collections[name]['Paper']
            if name in OTHER_METHODS:
                assert set(paper) == {'Title', 'URL'} and paper['Title'] != TITLE, (meta, paper)
            else:
                assert paper == {'Title': TITLE, 'URL': PAPER_URL}, (meta, paper)


def markdown_rows(path):
    """(cells, config path relative to REPO) of every table row of ``path`` naming a config."""
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            match = re.search(r'`([^`]+\.py)`', cells[-1]) if line.startswith('|') else None
            if match:
                yield cells, osp.normpath(osp.join(osp.dirname(path), match.group(1)))


def test_paper_numbers_agree_with_the_config_tables():
    """The metafiles' top-1 and AP are the paper's numbers that the READMEs list."""
    results = {osp.join(REPO, model['Config']): model.get('Results')
               for _, model in index_entries()}

    def metric(config, task, name):
        for result in results[config] or []:
            if result['Task'] == task:
                return result['Metrics'][name]
        return None

    rows = 0
    for readme in ('configs/README.md', 'configs/kw_resnet/ablations/README.md'):
        for cells, config in markdown_rows(osp.join(REPO, readme)):
            if not re.fullmatch(r'\d+\.\d+|–', cells[-2]):
                continue  # not a table of ImageNet results
            paper = None if cells[-2] == '–' else float(cells[-2])
            assert metric(config, 'Image Classification', 'Top 1 Accuracy') == paper, config
            rows += 1
    assert rows >= 40
    # docs/checkpoints.md: the released Mask R-CNNs with the paper's box / mask AP (Table 3)
    with open(osp.join(REPO, 'docs', 'checkpoints.md')) as f:
        released = [line for line in f if line.startswith('| `kw')]
    assert len(released) == 5
    for line in released:
        cells = [c.strip(' `') for c in line.strip().strip('|').split('|')]
        config = osp.join(REPO, 'configs', 'mask_rcnn', cells[1])
        box, mask = (float(c.split()[0]) for c in cells[2:4])
        assert metric(config, 'Object Detection', 'box AP') == box, config
        assert metric(config, 'Instance Segmentation', 'mask AP') == mask, config


def test_the_index_is_valid_and_registered_on_import():
    index = model_zoo.load_model_index()
    names = sorted(m.name for m in index.models)
    assert len(names) == len(indexed_configs())
    from mmpretrain.apis import ModelHub
    for model in index.models:
        registered = ModelHub._models_dict[model.name]
        assert registered.config == osp.join(REPO, model.config)
    # registering again is a no-op that returns the same names
    assert model_zoo.register_model_index() == names


def test_a_broken_metafile_is_refused_by_name(tmp_path):
    (tmp_path / 'configs' / 'a').mkdir(parents=True)
    (tmp_path / 'model-index.yml').write_text(
        'Import:\n  - configs/a/metafile.yml\n  - configs/b/metafile.yml\n')
    (tmp_path / 'configs' / 'a' / 'metafile.yml').write_text(
        'Models:\n  - Name: same\n    Config: configs/a/x.py\n'
        '  - Name: same\n    Config: configs/a/y.py\n')
    with pytest.raises(ValueError, match=r'configs/b/metafile\.yml(.|\n)*used more than once: '
                                         r'same'):
        model_zoo.load_model_index(str(tmp_path / 'model-index.yml'))


def test_registering_after_mmpretrains_own_models(mmpretrain_models, monkeypatch):
    """The other order than this process's (where `import kw_mm` came first): mmpretrain's
    models are in ModelHub before kw_mm registers; registering again changes nothing."""
    from mmpretrain.apis import ModelHub, list_models
    monkeypatch.setattr(ModelHub, '_models_dict', dict(mmpretrain_models))
    monkeypatch.setattr(model_zoo, '_registered_index', None)
    ours = model_zoo.register_model_index()
    assert model_zoo.register_model_index() == ours
    assert sorted(ModelHub._models_dict) == sorted([*mmpretrain_models, *ours])
    assert 'kw1x-resnet18_8xb32_in1k' in list_models('kw1x')


def test_a_name_taken_by_another_model_is_refused(monkeypatch):
    from mmpretrain.apis import ModelHub
    other = model_zoo.load_model_index().models[0]
    other.config = '/elsewhere/config.py'
    monkeypatch.setattr(ModelHub, '_models_dict', {other.name: other})
    monkeypatch.setattr(model_zoo, '_registered_index', None)
    with pytest.raises(ValueError, match=f'already has models named {other.name} '
                                         r'\(registered for /elsewhere/config\.py\)'):
        model_zoo.register_model_index()


def test_list_models_lists_every_kw_config():
    from mmpretrain import list_models
    from mmpretrain.apis import ImageClassificationInferencer
    kw = {m['Name'] for _, m in index_entries() if re.match(r'kw\d', m['Name'])}
    assert len(kw) >= 35
    listed = set(list_models('*kw*'))
    assert kw <= listed
    assert listed <= {m['Name'] for _, m in index_entries()}  # nothing of mmpretrain's
    assert 'kw1x-resnet18_8xb32_in1k' in ImageClassificationInferencer.list_models('kw1x')


def test_get_model_by_name_loads_the_checkpoint(zoo_files, fresh_default_scope):
    from mmpretrain import get_model
    path = zoo_files.path('kw1x_resnet50_mm.pth')
    model = get_model('kw1x-resnet50_32xb128-adv-300e_in1k', pretrained=str(path))
    assert type(model.backbone).__name__ == 'KWResNet' and model.backbone.depth == 50
    saved = torch.load(path, weights_only=True)['state_dict']
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key in ('backbone.warehouses.0.cells', 'head.fc.weight'):
        assert torch.equal(state[key], saved[key]), key
    assert model._config.filename == kw_mm.find_config('kw1x-resnet50_32xb128-adv-300e_in1k')


def test_image_classification_inferencer_by_name(zoo_files, fresh_default_scope):
    from mmpretrain.apis import ImageClassificationInferencer
    path = zoo_files.path('kw1x_resnet18_mm.pth')
    inferencer = ImageClassificationInferencer('kw1x-resnet18_8xb32_in1k', pretrained=str(path))
    saved = torch.load(path, weights_only=True)['state_dict']
    assert torch.equal(inferencer.model.state_dict()['backbone.warehouses.1.cells'],
                       saved['backbone.warehouses.1.cells'])
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    [result] = inferencer(image)
    scores = result['pred_scores']
    assert scores.shape == (1000,) and np.isclose(scores.sum(), 1.0, atol=1e-4)
    assert result['pred_label'] == int(scores.argmax())
    assert result['pred_class'] == inferencer.classes[result['pred_label']]


@pytest.mark.parametrize('entry,twin', [
    ('mask_rcnn_kw_r50.py', 'mask_rcnn/mask-rcnn_kw1x-resnet50_fpn_1x_coco.py'),
    ('mask_rcnn_kw4x_r50.py', 'mask_rcnn/mask-rcnn_kw4x-resnet50_fpn_1x_coco.py')])
def test_mask_rcnn_entry_points_equal_their_zoo_twins(entry, twin, fresh_default_scope):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    configs = [Config.fromfile(osp.join(REPO, 'configs', name)) for name in (entry, twin)]
    first, second = (c.to_dict() for c in configs)
    assert first == second
    init_default_scope('mmdet')
    with torch.device('meta'):
        models = [MODELS.build(c.model) for c in configs]
    layouts = [[(name, type(module).__name__) for name, module in m.named_modules()]
               for m in models]
    assert layouts[0] == layouts[1]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in models]
    assert shapes[0] == shapes[1]
    assert first['model']['backbone']['kw_cfg']['budget'] == (4.0 if 'kw4x' in entry else 1.0)
