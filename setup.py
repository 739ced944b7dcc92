import os
import os.path as osp
import platform
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))

#: what the package carries under kw_mm/.mim, the OpenMMLab way (mmdet and
#: mmpretrain do the same): the configs, so that user configs can inherit
#: `_base_ = 'kw_mm::<folder>/<config>.py'` and the converter finds its
#: configs once installed, and the tools, for `mim train kw_mm ...`
MIM_FILES = ('configs', 'tools', 'model-index.yml')


def read_version():
    scope = {}
    with open(osp.join(HERE, 'kw_mm', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def read_requirements(path):
    with open(osp.join(HERE, path)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


def add_mim_extension():
    """Put MIM_FILES into kw_mm/.mim before the package is collected.

    Editable installs (`pip install -e .`) get symbolic links to the
    repository's files, so edits show at once; every other build (wheels,
    sdists, `pip install .`) gets copies. Other commands (egg_info, ...)
    leave kw_mm/.mim alone. kw_mm/.mim is generated: git ignores it.
    """
    if 'develop' in sys.argv or 'editable_wheel' in sys.argv:
        mode = 'copy' if platform.system() == 'Windows' else 'symlink'
    elif {'sdist', 'bdist_wheel', 'build', 'build_py', 'install'} & set(sys.argv):
        mode = 'copy'
    else:
        return
    mim_dir = osp.join(HERE, 'kw_mm', '.mim')
    os.makedirs(mim_dir, exist_ok=True)
    for name in MIM_FILES:
        src = osp.join(HERE, name)
        dst = osp.join(mim_dir, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if not osp.exists(src):
            if name == 'model-index.yml':
                # mmengine reads the index for every `kw_mm::` base before it
                # falls back to .mim/configs/<path>; an index without models
                # lets it fall back
                with open(dst, 'w') as f:
                    f.write('Import: []\n')
            continue
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_dir), dst, target_is_directory=osp.isdir(src))
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='kw_mm',
        version=read_version(),
        description='KernelWarehouse dynamic convolution (ICML 2024) for OpenMMLab '
                    '(mmpretrain / mmdet backbones, hooks, configs and tools)',
        long_description=open(osp.join(HERE, 'README.md')).read(),
        long_description_content_type='text/markdown',
        packages=find_packages(include=['kw_mm', 'kw_mm.*']),
        package_data={
            'kw_mm': [
                'py.typed',
                '.mim/model-index.yml',
                '.mim/configs/**/*.py',
                '.mim/configs/**/*.md',
                '.mim/configs/**/*.yml',
                '.mim/tools/**/*.py',
                '.mim/tools/**/*.sh',
            ],
            # compiled on first use by kw_mm.native (needs a C compiler; optional)
            'kw_mm.native': ['kw_kernels.c'],
        },
        # torch.serialization.safe_globals (2.5) and torch 2.5's Python >= 3.9;
        # tested with Python 3.11 and the versions in requirements/constraints.txt
        python_requires='>=3.9',
        # What `import kw_mm` and its configs need, in the ranges the OpenMMLab
        # 2.x stack accepts (mmdet 3.3 needs mmcv < 2.2; mmcv must be built
        # with its ops for Mask R-CNN). tools/setup_venv.sh installs the tested
        # versions and then kw_mm with --no-deps, so these never change it.
        install_requires=[
            'torch>=2.5',
            'numpy',
            'mmengine>=0.10.0,<0.11.0',
            'mmcv>=2.0.0,<2.2.0',
            'mmpretrain>=1.0.0,<1.3.0',
            'mmdet>=3.0.0,<3.4.0',
        ],
        extras_require={
            'all': read_requirements('requirements/runtime.txt'),
            'tests': read_requirements('requirements/tests.txt'),
            'export': read_requirements('requirements/export.txt'),
        },
        license='Apache-2.0',
        classifiers=[
            'Programming Language :: Python :: 3',
            'Typing :: Typed',
        ],
        zip_safe=False,
    )
