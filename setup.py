from setuptools import find_packages, setup


def read_version():
    scope = {}
    with open('kw_mm/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


def read_requirements(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


setup(
    name='kw_mm',
    version=read_version(),
    description='KernelWarehouse dynamic convolution (ICML 2024) for OpenMMLab '
                '(mmpretrain / mmdet backbones, hooks, configs and tools)',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['kw_mm', 'kw_mm.*']),
    # compiled on first use by kw_mm.native (needs a C compiler; optional)
    package_data={'kw_mm.native': ['kw_kernels.c']},
    python_requires='>=3.8',
    # The OpenMMLab stack is not pinned here so that `pip install -e .` does not
    # touch an environment that already has it; requirements/ lists the tested
    # versions and tools/setup_venv.sh installs them.
    install_requires=['torch', 'numpy'],
    extras_require={
        'all': read_requirements('requirements/runtime.txt'),
        'tests': read_requirements('requirements/tests.txt'),
        'export': read_requirements('requirements/export.txt'),
    },
    license='Apache-2.0',
    zip_safe=False,
)
