"""The installable package: what the wheel carries, and kw_mm used from an installed copy."""
import email
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest

from kw_mm.utils import config_paths
from kw_mm.utils.config_paths import config_root, find_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def repo_files(folder, suffixes):
    """Files under REPO/folder with one of ``suffixes``, relative to REPO/folder."""
    found = set()
    for root, dirs, files in os.walk(osp.join(REPO, folder)):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        for name in files:
            if name.endswith(suffixes):
                found.add(osp.relpath(osp.join(root, name), osp.join(REPO, folder)))
    return found


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """A wheel built as `pip install .` builds it, from a copy of the checkout
    (the build writes kw_mm/.mim, build/ and *.egg-info beside its sources)."""
    work = tmp_path_factory.mktemp('wheel')
    src = work / 'src'
    top = {'.git', '.venv', 'data', 'work_dirs', 'build', 'dist', 'tests'}
    generated = shutil.ignore_patterns('__pycache__', '*.egg-info', '.mim')

    def ignore(folder, names):
        return set(generated(folder, names)) | (top & set(names) if folder == REPO else set())

    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
         '--no-index', '-w', str(work / 'dist'), str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    [path] = (work / 'dist').glob('kw_mm-*.whl')
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_carries_every_config_and_tool(wheel):
    names = set(wheel.namelist())
    configs = {n[len('kw_mm/.mim/configs/'):] for n in names
               if n.startswith('kw_mm/.mim/configs/')}
    assert configs == repo_files('configs', ('.py', '.md', '.yml'))
    tools = {n[len('kw_mm/.mim/tools/'):] for n in names if n.startswith('kw_mm/.mim/tools/')}
    assert tools == repo_files('tools', ('.py', '.sh'))
    # mmengine reads the model index before resolving any `kw_mm::` base; kw_mm registers it
    # with mmpretrain
    with open(osp.join(REPO, 'model-index.yml'), 'rb') as f:
        assert wheel.read('kw_mm/.mim/model-index.yml') == f.read()
    assert {'kw_mm/py.typed', 'kw_mm/native/kw_kernels.c',
            'kw_mm/utils/config_paths.py'} <= names
    assert not any(n.startswith('tests/') or '__pycache__' in n for n in names)
    # copies, not links to a checkout that the installed package cannot rely on
    assert all(info.external_attr >> 28 != 0o12 for info in wheel.infolist())


def test_wheel_metadata_declares_the_stack(wheel):
    [meta] = [n for n in wheel.namelist() if n.endswith('.dist-info/METADATA')]
    metadata = email.message_from_bytes(wheel.read(meta))
    requires = {r.split(';')[0].replace(' ', '') for r in metadata.get_all('Requires-Dist')
                if 'extra ==' not in r}
    names = {r.split('<')[0].split('>')[0].split('=')[0] for r in requires}
    assert {'torch', 'numpy', 'mmengine', 'mmcv', 'mmpretrain', 'mmdet'} <= names
    assert 'mmcv<2.2.0,>=2.0.0' in requires  # mmdet 3.3 refuses mmcv 2.2
    assert metadata['Requires-Python'] == '>=3.9'
    assert metadata['License'] == 'Apache-2.0'
    assert any(n.endswith('.dist-info/licenses/LICENSE') for n in wheel.namelist())


def test_installed_package_works_outside_the_repository():
    """tools/check_install.sh: a fresh virtualenv gets the wheel; from another
    directory, kw_mm imports from it, finds and builds a config by name, its
    converter converts a released-layout checkpoint, and a user config with
    ``_base_ = 'kw_mm::...'`` builds, and ``mim train kw_mm`` trains one with
    the installed tools/train.py (the stack has openmim: requirements/mim.txt)."""
    result = subprocess.run(['bash', osp.join(REPO, 'tools', 'check_install.sh'),
                             sys.executable], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for step in ('1. import kw_mm', '2. find_config', '3. kw_mm/.mim/tools/convert_official_kw.py',
                 "4. _base_ = 'kw_mm::",
                 '5. mim train kw_mm my_shapes.py: kw_mm/.mim/tools/train.py',
                 'install check passed'):
        assert step in result.stdout, output


def test_config_root_of_a_checkout_is_its_configs_folder():
    assert config_root() == osp.join(REPO, 'configs')


@pytest.mark.parametrize('spelling', [
    'kw1x-resnet18_8xb32_in1k', 'kw1x-resnet18_8xb32_in1k.py',
    'kw_resnet/kw1x-resnet18_8xb32_in1k.py', 'configs/kw_resnet/kw1x-resnet18_8xb32_in1k.py',
    'kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py',
    'kw_mm::configs/kw_resnet/kw1x-resnet18_8xb32_in1k.py'])
def test_find_config_spellings(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative spellings are not files here
    assert find_config(spelling) == osp.join(REPO, 'configs', 'kw_resnet',
                                             'kw1x-resnet18_8xb32_in1k.py')


def test_find_config_takes_an_existing_file_as_it_is(tmp_path, monkeypatch):
    own = tmp_path / 'configs' / 'kw_resnet' / 'kw1x-resnet18_8xb32_in1k.py'
    own.parent.mkdir(parents=True)
    own.write_text("_base_ = 'kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py'\n")
    monkeypatch.chdir(tmp_path)
    assert find_config('configs/kw_resnet/kw1x-resnet18_8xb32_in1k.py') == str(own)
    # kw_mm:: always means kw_mm's own configs
    assert find_config('kw_mm::configs/kw_resnet/kw1x-resnet18_8xb32_in1k.py') == osp.join(
        REPO, 'configs', 'kw_resnet', 'kw1x-resnet18_8xb32_in1k.py')


def test_find_config_refuses_unknown_and_ambiguous_names(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="'kw9x-resnet18' not found"):
        find_config('kw9x-resnet18')
    with pytest.raises(FileNotFoundError, match="'kw_mm::kw_resnet/nope.py' not found among"):
        find_config('kw_mm::kw_resnet/nope.py')
    with pytest.raises(ValueError, match='name_or_path'):
        find_config('')
    for folder in ('a', 'b'):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / 'same.py').write_text('')
    monkeypatch.setattr(config_paths, 'config_root', lambda: str(tmp_path))
    with pytest.raises(ValueError, match=r"'same' is ambiguous.*a/same\.py, b/same\.py"):
        find_config('same')
    assert find_config('b/same') == str(tmp_path / 'b' / 'same.py')


def test_kw_mm_bases_resolve_from_a_checkout():
    """An editable install or a checkout on PYTHONPATH has no kw_mm/.mim, where mmengine looks
    for `kw_mm::` bases: kw_mm resolves them with find_config."""
    from mmengine.config import Config

    import kw_mm  # noqa: F401
    path, scope = Config._get_cfg_path('kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py', 'my.py')
    assert (path, scope) == (osp.join(REPO, 'configs', 'kw_resnet',
                                      'kw1x-resnet18_8xb32_in1k.py'), None)
    path, scope = Config._get_cfg_path('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 'my.py')
    assert scope == 'mmdet' and osp.isfile(path)  # other packages' bases as before
    with pytest.raises(FileNotFoundError, match="'kw_mm::kw_resnet/nope.py' not found"):
        Config._get_cfg_path('kw_mm::kw_resnet/nope.py', 'my.py')


def test_importing_kw_mm_lets_mmengine_resolve_kw_mm_bases():
    from mmengine.config.utils import MODULE2PACKAGE, _get_package_and_cfg_path

    import kw_mm  # noqa: F401
    assert MODULE2PACKAGE['kw_mm'] == 'kw_mm'
    assert _get_package_and_cfg_path('kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py') == (
        'kw_mm', 'kw_resnet/kw1x-resnet18_8xb32_in1k.py')


def test_installed_package_gives_mmpretrain_its_models_by_name(wheel, tmp_path, monkeypatch):
    """With the wheel's kw_mm/.mim (a non-editable install) and no checkout around, the model
    index and the configs it names are the package's, and ModelHub builds them by name."""
    from mmpretrain.apis import ModelHub

    from kw_mm.utils import model_zoo
    mim = [n for n in wheel.namelist() if n.startswith('kw_mm/.mim/')]
    wheel.extractall(tmp_path, members=mim)
    installed = tmp_path / 'kw_mm' / '.mim'
    monkeypatch.setattr(config_paths, '_checkout_root', lambda: None)
    monkeypatch.setattr(config_paths, 'MIM_DIR', str(installed))
    assert model_zoo.model_index_path() == str(installed / 'model-index.yml')
    monkeypatch.setattr(ModelHub, '_models_dict', {})
    monkeypatch.setattr(ModelHub, '_ModelHub__mmpretrain_registered', True)
    monkeypatch.setattr(model_zoo, '_registered_index', None)
    names = model_zoo.register_model_index()
    assert len(names) == len(model_zoo.load_model_index(str(installed / 'model-index.yml')).models)
    for name in names:
        assert ModelHub._models_dict[name].config.startswith(str(installed / 'configs') + '/')
        assert osp.isfile(ModelHub._models_dict[name].config), name
    config = ModelHub.get('kw1x-resnet18_8xb32_in1k').config
    assert config.filename == str(installed / 'configs' / 'kw_resnet' /
                                  'kw1x-resnet18_8xb32_in1k.py')
    assert config.model.backbone.type == 'KWResNet'
