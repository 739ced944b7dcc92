"""Throughput and memory of two models, measured side by side in one process.

    python tools/benchmark.py                       # KW 1x vs plain ResNet50 and ResNet18
    python tools/benchmark.py A.py B.py             # any two mmpretrain configs (A vs B)
    python tools/benchmark.py --suite all --json out.json --markdown out.md
    python tools/benchmark.py --onnx --suite resnet18,resnet50,mobilenet_v2  # ONNX Runtime
    python tools/benchmark.py --methods resnet50,mobilenet_v2 --inputs cls   # vs plain

``--methods`` times each dynamic convolution of the paper's comparisons (DY-Conv
4×, ODConv 4×, KW 1/2×, 1×, 4×) against the plain model of the family, one
pair per method, and ends with a summary: parameters, and throughput and
peak training memory relative to the plain model.

For each pair it times inference (``no_grad``) and a training step (forward,
cross-entropy / feature loss, backward, SGD step), on classification input
(batch 8, 3×224×224, the whole classifier) and detection input (batch 2,
3×800×1216, backbone only). Repetitions of A and B are interleaved after a
warm-up, so both see the same machine state; the table gives medians,
the spread (min–max) and the ratio throughput(A) / throughput(B). Peak
memory of a training step is measured in a fresh subprocess per model
(CPU: peak RSS growth over the built model; CUDA: max allocated). Each pair
of a suite is measured in a fresh process of its own (``--same-process``
keeps them in this one), so its timings do not depend on the heap that the
pairs before it left. ``--modes infer`` (or ``train``) times one of the two.

Models are timed at τ = 0 (the trained state) with their BatchNorm statistics
settled on a few random batches (:func:`settle_batch_norm`): with the initial
statistics a fresh KW model's activations decay into denormal floats, which
CPUs process up to 10× slower, so inference would time that and not the model.
With ``--onnx`` it exports both models of each pair with kw_mm.export
(checked against PyTorch, into a temporary directory) and times them in ONNX
Runtime instead (classification input at batch 1 and 8, inference only),
interleaved, at ONNX Runtime's full graph optimisation and with it off.
This is a script, not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from kw_mm.checkpoint.io import write_atomically  # noqa: E402
from kw_mm.utils.allocator import tune_cpu_allocator  # noqa: E402

SUITES = {
    'resnet50': ('configs/kw_resnet/kw1x-resnet50_8xb32_in1k.py',
                 'configs/kw_resnet/resnet50_8xb32_in1k.py'),
    'resnet18': ('configs/kw_resnet/kw1x-resnet18_8xb32_in1k.py',
                 'configs/kw_resnet/resnet18_8xb32_in1k.py'),
    'mobilenet_v2': ('configs/kw_mobilenet_v2/kw1x-mobilenet-v2_8xb32_in1k.py',
                     'configs/kw_mobilenet_v2/mobilenet-v2_8xb32_in1k.py'),
}
#: ``--methods``: per family, the plain model and each method's config (A of a pair
#: whose B is the plain one); the recipes differ, the models are the paper's.
METHODS = {
    'resnet50': ('configs/kw_resnet/resnet50_8xb32_in1k.py', {
        'dyconv4x': 'configs/kw_resnet/dyconv4x-resnet50_32xb128-adv-300e_in1k.py',
        'odconv4x': 'configs/kw_resnet/odconv4x-resnet50_32xb128-adv-300e_in1k.py',
        'kw1d2x': 'configs/kw_resnet/kw1d2x-resnet50_8xb32_in1k.py',
        'kw1x': 'configs/kw_resnet/kw1x-resnet50_8xb32_in1k.py',
        'kw4x': 'configs/kw_resnet/kw4x-resnet50_8xb32_in1k.py',
    }),
    'mobilenet_v2': ('configs/kw_mobilenet_v2/mobilenet-v2_8xb32_in1k.py', {
        'dyconv4x': 'configs/kw_mobilenet_v2/dyconv4x-mobilenet-v2_8xb32_in1k.py',
        'odconv4x': 'configs/kw_mobilenet_v2/odconv4x-mobilenet-v2_8xb32_in1k.py',
        'kw1d2x': 'configs/kw_mobilenet_v2/kw1d2x-mobilenet-v2_8xb32_in1k.py',
        'kw1x': 'configs/kw_mobilenet_v2/kw1x-mobilenet-v2_8xb32_in1k.py',
        'kw4x': 'configs/kw_mobilenet_v2/kw4x-mobilenet-v2_8xb32_in1k.py',
    }),
}
#: every pair ``--suite`` can name: the default suites and the ``--methods`` pairs
#: (``<family>:<method>``, e.g. ``resnet50:odconv4x``)
PAIRS = dict(SUITES, **{f'{family}:{method}': (config, plain)
                        for family, (plain, configs) in METHODS.items()
                        for method, config in configs.items()})
#: detection-size input is measured for these pairs only (the issue's table)
DET_PAIRS = ('resnet50', 'A vs B')
INPUTS = {'cls': (8, 224, 224), 'det': (2, 800, 1216)}


AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
#: --modes: what is timed per pair and input
MODES = ('infer', 'train')


def settle_batch_norm(model: torch.nn.Module, device: str = 'cpu', batches: int = 2,
                      batch: int = 4, size: int = 224) -> None:
    """Set the running statistics of the model's 2-D and 3-D BatchNorm layers
    to those of a few batches of random ``size``² images (τ as set), as
    training leaves them.

    A freshly built model keeps the initial statistics (mean 0, variance 1),
    so in inference its normalisation layers do not normalise: the activations
    of a KW model at τ = 0 then shrink layer after layer (MobileNetV2's reach
    1e-20 by the fourth convolution and then denormal floats, which CPUs process
    up to 10× slower than normal ones), and inference times would measure that
    instead of the model. A trained model's statistics keep activations near unit
    scale; these do too. Both models of a pair are settled the same way.

    The attentions' BatchNorm1d keep their initial statistics: the pooled
    features of random images hardly differ between images, and a variance
    estimated from them would make each attention amplify a sample's rounding
    differences into different kernels."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, torch.nn.BatchNorm1d)]
    if not norms:
        return
    net = getattr(model, 'backbone', model)
    training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            net(torch.randn(batch, 3, size, size, generator=generator).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(training)


def build(config: str, device: str, cfg_options: Optional[Dict] = None):
    from kw_mm import set_temperature
    from kw_mm.apis import build_from_config
    model = build_from_config(osp.join(ROOT, config), cfg_options=cfg_options).to(device)
    set_temperature(model, 0.0)  # the trained state; τ does not change the cost
    settle_batch_norm(model, device)
    return model


def make_step(model, kind: str, mode: str, batch: int, device: str,
              amp: Optional[str] = None) -> Callable[[], None]:
    h, w = INPUTS[kind][1:]
    x = torch.randn(batch, 3, h, w, device=device)
    net = model if kind == 'cls' else model.backbone

    def autocast():
        return (torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp]) if amp
                else contextlib.nullcontext())
    if mode == 'infer':
        net.eval()

        def step():
            with torch.no_grad(), autocast():
                net(x, mode='tensor') if kind == 'cls' else net(x)
        return step
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            if kind == 'cls':
                loss = torch.nn.functional.cross_entropy(net(x, mode='tensor').float(), labels)
            else:
                loss = sum(o.float().square().mean() for o in net(x))
        loss.backward()
        opt.step()
    return step


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_pair(steps: Tuple[Callable, Callable], device: str, warmup: int, reps: int
              ) -> Tuple[List[float], List[float]]:
    for _ in range(warmup):
        for step in steps:
            step()
    sync(device)
    times: Tuple[List[float], List[float]] = ([], [])
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for i in order:
            start = time.perf_counter()
            steps[i]()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return times


def peak_memory(config: str, kind: str, batch: int, device: str,
                cfg_options: Optional[Dict] = None, amp: Optional[str] = None) -> float:
    """Peak memory (MiB) of two training steps, in a fresh subprocess.

    CPU: growth of the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs`` after the model is built; ``ru_maxrss`` would
    carry the parent's peak across fork/exec). CUDA: ``max_memory_allocated``.
    """
    code = (
        'import sys, torch; sys.path.insert(0, %r)\n'
        'from tools.benchmark import build, make_step, vm_kib\n'
        'torch.set_num_threads(%d)\n'
        'from kw_mm.utils.allocator import tune_cpu_allocator; tune_cpu_allocator()\n'
        'm = build(%r, %r, %r); step = make_step(m, %r, "train", %d, %r, %r)\n'
        'cuda = %r.startswith("cuda")\n'
        'if cuda: torch.cuda.reset_peak_memory_stats()\n'
        'else:\n'
        '    base = vm_kib("VmRSS"); open("/proc/self/clear_refs", "w").write("5")\n'
        'step(); step()\n'
        'print(torch.cuda.max_memory_allocated() / 2**20 if cuda\n'
        '      else (vm_kib("VmHWM") - base) / 1024)\n'
    ) % (ROOT, torch.get_num_threads(), config, device, cfg_options, kind, batch, device, amp,
         device)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f'memory probe failed for {config}:\n{out.stderr[-2000:]}')
    return float(out.stdout.strip().splitlines()[-1])


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (e.g. VmRSS, VmHWM) in KiB."""
    from kw_mm.utils.memory import proc_status_kib
    kib = proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f'{field} not found in /proc/self/status')
    return kib


def run(pairs: Dict[str, Tuple[str, str]], kinds: List[str], device: str, warmup: int,
        reps: int, cls_batch: int, memory: bool, a_options: Optional[Dict] = None,
        amp: Optional[str] = None, modes: Tuple[str, ...] = MODES) -> List[Dict]:
    rows = []
    progress = RowProgress(sum(len(modes) * sum(k == 'cls' or name in DET_PAIRS for k in kinds)
                               for name in pairs))
    for name, (a_cfg, b_cfg) in pairs.items():
        models = (build(a_cfg, device, a_options), build(b_cfg, device))
        params = [sum(p.numel() for p in m.parameters()) for m in models]
        for kind in kinds:
            if kind == 'det' and name not in DET_PAIRS:
                continue
            batch = cls_batch if kind == 'cls' else INPUTS['det'][0]
            for mode in modes:
                steps = tuple(make_step(m, kind, mode, batch, device, amp) for m in models)
                ta, tb = time_pair(steps, device, warmup, reps)
                ma, mb = statistics.median(ta), statistics.median(tb)
                row = dict(pair=name, a=a_cfg, b=b_cfg, input=kind, batch=batch, mode=mode,
                           a_median_s=ma, b_median_s=mb, a_spread_s=[min(ta), max(ta)],
                           b_spread_s=[min(tb), max(tb)], ratio=mb / ma,
                           a_params=params[0], b_params=params[1],
                           per_rep_ratios=[b / a for a, b in zip(ta, tb)])
                if memory and mode == 'train':
                    row['a_peak_mib'] = peak_memory(a_cfg, kind, batch, device, a_options, amp)
                    row['b_peak_mib'] = peak_memory(b_cfg, kind, batch, device, None, amp)
                    row['memory_ratio'] = row['a_peak_mib'] / max(row['b_peak_mib'], 1e-9)
                rows.append(row)
                print(format_row(row), flush=True)
                progress.update()
        del models
    return rows


class RowProgress:
    """An mmengine ProgressBar on stderr, one line per finished row (the table
    stays on stdout)."""

    def __init__(self, total: int) -> None:
        from mmengine.utils import ProgressBar
        self.bar = ProgressBar(total, file=sys.stderr) if total > 0 else None
        self._newline()

    def _newline(self) -> None:
        if self.bar is not None:
            sys.stderr.write('\n')
            sys.stderr.flush()

    def update(self, rows: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(rows)
            self._newline()


#: --onnx-levels: ONNX Runtime's graph optimisation levels by name
ORT_LEVELS = {'all': 'ORT_ENABLE_ALL', 'extended': 'ORT_ENABLE_EXTENDED',
              'basic': 'ORT_ENABLE_BASIC', 'disable': 'ORT_DISABLE_ALL'}


#: τ at which the benchmark checks a KW model's export against PyTorch. At τ = 0 a randomly
#: initialised KW model amplifies rounding differences: a 1e-6 relative change of the input moves
#: KW MobileNetV2's logits by about 7% (KW ResNet50's by 1e-4, the plain models' by 2e-5), so
#: no tolerance would tell a correct graph from a wrong one. At τ = 0.5 the attentions'
#: initialisation term keeps it at the plain models' 2e-5.
CHECK_TEMPERATURE = 0.5


def export_pair_onnx(pair: Tuple[str, str], out_dir: str, size: Tuple[int, int],
                     options: Tuple[Optional[Dict], Optional[Dict]] = (None, None)
                     ) -> Tuple[str, str]:
    """Export configs A and B at τ = 0 (the trained state) with :mod:`kw_mm.export`
    after :func:`settle_batch_norm`, to ``out_dir``; returns the two ONNX files.

    Each model's graph is checked against PyTorch (kw_mm.export's tolerance)
    before its file is written: a KW model's at :data:`CHECK_TEMPERATURE` (its
    statistics settled there), then settled and exported again at τ = 0 (τ is
    a constant of the graph)."""
    from kw_mm import set_temperature
    from kw_mm.export import build_exportable, export_and_verify, export_onnx, verify_onnx
    paths = []
    shape = (3, *size)
    for tag, config, cfg_options in zip('ab', pair, options):
        model = build_exportable(osp.join(ROOT, config), cfg_options=cfg_options)
        path = osp.join(out_dir, f'{tag}.onnx')
        if set_temperature(model, CHECK_TEMPERATURE) > 0:
            settle_batch_norm(model)
            verify_onnx(export_onnx(model, shape)[0], model, shape)
            set_temperature(model, 0.0)
            settle_batch_norm(model)  # the statistics of the τ = 0 activations
            graph = export_onnx(model, shape)[0]
            write_atomically(path, lambda f: f.write(graph))
        else:
            settle_batch_norm(model)
            export_and_verify(model, path, shape)
        paths.append(path)
        del model
    return paths[0], paths[1]


def ort_session(path: str, level: str, threads: int):
    """An ONNX Runtime CPU session of ``path`` at graph optimisation ``level``
    (a key of :data:`ORT_LEVELS`) with ``threads`` intra-op threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def run_onnx(pairs: Dict[str, Tuple[str, str]], batches: List[int], levels: List[str],
             threads: int, warmup: int, reps: int, size: Tuple[int, int] = INPUTS['cls'][1:],
             options: Tuple[Optional[Dict], Optional[Dict]] = (None, None)) -> List[Dict]:
    """Rows of ONNX Runtime inference, A against B: each pair exported once,
    then for every optimisation level and batch size the two sessions' runs
    interleaved (as :func:`time_pair`)."""
    rows = []
    progress = RowProgress(len(pairs) * len(levels) * len(batches))
    for name, pair in pairs.items():
        with tempfile.TemporaryDirectory(prefix='kw_mm_onnx_benchmark_') as tmp:
            paths = export_pair_onnx(pair, tmp, size, options)
            for level in levels:
                sessions = [ort_session(p, level, threads) for p in paths]
                for batch in batches:
                    feed = {'input': torch.randn(batch, 3, *size).numpy()}
                    steps = tuple((lambda s=s: s.run(None, feed)) for s in sessions)
                    ta, tb = time_pair(steps, 'cpu', warmup, reps)
                    ma, mb = statistics.median(ta), statistics.median(tb)
                    row = dict(pair=name, a=pair[0], b=pair[1], input='cls', batch=batch,
                               mode=f'onnx {level}', a_median_s=ma, b_median_s=mb,
                               a_spread_s=[min(ta), max(ta)], b_spread_s=[min(tb), max(tb)],
                               ratio=mb / ma, per_rep_ratios=[b / a for a, b in zip(ta, tb)])
                    rows.append(row)
                    print(format_row(row), flush=True)
                    progress.update()
                del sessions
    return rows


def parse_onnx_args(parser: argparse.ArgumentParser, args: argparse.Namespace
                    ) -> Tuple[List[int], List[str]]:
    """Check the ``--onnx`` options (usage errors name the option); returns the
    batch sizes and optimisation levels."""
    if args.device != 'cpu':
        parser.error(f'--onnx times ONNX Runtime on the CPU: use --device cpu, got '
                     f'{args.device!r}')
    if args.amp:
        parser.error('--onnx exports float32 models: --amp does not apply')
    if args.methods:
        parser.error('--onnx times the --suite pairs or two configs, not --methods')
    try:
        batches = [int(b) for b in args.onnx_batches.split(',')]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f'--onnx-batches must be comma-separated positive ints, got '
                     f'{args.onnx_batches!r}')
    levels = args.onnx_levels.split(',')
    unknown = [level for level in levels if level not in ORT_LEVELS]
    if unknown:
        parser.error(f'--onnx-levels: unknown level(s) {unknown}; choose from '
                     f'{list(ORT_LEVELS)}')
    try:
        from kw_mm.export import require_export_dependencies
        require_export_dependencies()
    except ImportError as err:
        parser.error(f'--onnx: {err}')
    return batches, levels


def run_isolated(name: str, argv: List[str]) -> List[Dict]:
    """The rows of suite pair ``name``, measured by this script in a fresh process
    (``argv`` as given, then the pair and a JSON file for its rows; the last
    occurrence of an option wins). Its two models are still timed side by side
    in that one process; what the fresh process removes is the heap the pairs
    before it left: after the ResNet50 pair's detection-size steps (5.7 GB
    resident) the KW ResNet18's inference took 0.31 s instead of 0.28 s, the
    plain one's 0.19 s instead of 0.18 s."""
    with tempfile.TemporaryDirectory(prefix='kw_mm_benchmark_') as tmp:
        out = osp.join(tmp, 'rows.json')
        proc = subprocess.run([sys.executable, osp.abspath(__file__), *argv, '--suite', name,
                               '--methods', '', '--json', out, '--markdown', '',
                               '--same-process'],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0 or not osp.exists(out):
            raise RuntimeError(f'benchmark of pair {name!r} failed (exit status '
                               f'{proc.returncode}):\n{proc.stderr[-2000:]}')
        with open(out) as f:
            rows = json.load(f)['rows']
    for row in rows:
        print(format_row(row), flush=True)
    return rows


HEADER = ('| pair | input | mode | A median (s) | B median (s) | A spread | B spread | '
          'throughput A/B | peak mem A/B |')


def format_row(row: Dict) -> str:
    mem = (f"{row['a_peak_mib']:.0f}/{row['b_peak_mib']:.0f} MiB = {row['memory_ratio']:.2f}x"
           if 'memory_ratio' in row else '')
    shape = f"{row['input']} b{row['batch']}"
    return (f"| {row['pair']} | {shape} | {row['mode']} | {row['a_median_s']:.3f} | "
            f"{row['b_median_s']:.3f} | {row['a_spread_s'][0]:.3f}–{row['a_spread_s'][1]:.3f} | "
            f"{row['b_spread_s'][0]:.3f}–{row['b_spread_s'][1]:.3f} | {row['ratio']:.2f}x | "
            f"{mem} |")


SUMMARY_HEADER = ('| family | method | params | params vs plain | inference vs plain | '
                  'training vs plain | training memory vs plain |')


def method_summary(rows: List[Dict]) -> str:
    """The ``--methods`` summary, one line per (family, method, input): the
    method's parameters and its throughput and training memory relative to
    the plain model (from the pairs' rows)."""
    lines = [SUMMARY_HEADER, '|' + '---|' * 7]
    seen: Dict[Tuple[str, str], Dict[str, Dict]] = {}
    for row in rows:
        if ':' in row['pair']:
            seen.setdefault((row['pair'], row['input']), {})[row['mode']] = row
    for (pair, kind), modes in seen.items():
        family, method = pair.split(':')
        first = next(iter(modes.values()))
        ratio = {mode: f"{modes[mode]['ratio']:.2f}x" if mode in modes else '–'
                 for mode in ('infer', 'train')}
        memory = modes.get('train', {}).get('memory_ratio')
        lines.append(f"| {family} | {method} ({kind}) | {first['a_params'] / 1e6:.2f}M | "
                     f"{first['a_params'] / first['b_params']:.2f}x | {ratio['infer']} | "
                     f"{ratio['train']} | {'–' if memory is None else f'{memory:.2f}x'} |")
    return '\n'.join(lines)


def method_pairs(parser: argparse.ArgumentParser, families: str
                 ) -> Dict[str, Tuple[str, str]]:
    """The ``--methods`` pairs of ``families`` ('all' or a comma-separated list)."""
    names = sorted(METHODS) if families == 'all' else families.split(',')
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        parser.error(f'--methods: unknown model famil(y/ies) {unknown}; choose from '
                     f'{sorted(METHODS)} or "all"')
    return {f'{family}:{method}': PAIRS[f'{family}:{method}']
            for family in names for method in METHODS[family][1]}


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Stop with a usage error unless ``device`` is the CPU or a visible CUDA GPU."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ('cpu', 'cuda'):
        parser.error(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if kind.type == 'cuda':
        if not torch.cuda.is_available():
            parser.error(f'--device {device}: CUDA is not available here '
                         '(torch.cuda.is_available() is False)')
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            parser.error(f'--device {device}: only {torch.cuda.device_count()} CUDA '
                         'device(s) visible')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='*', help='two configs: A (e.g. KW) and B (baseline)')
    parser.add_argument('--suite', default='resnet50,resnet18,mobilenet_v2',
                        help=f'comma-separated pairs from {sorted(SUITES)} or "all"')
    parser.add_argument('--methods', default='',
                        help=f'time DY-Conv 4x, ODConv 4x and KW 1/2x, 1x, 4x against the plain '
                             f'model of these families ({sorted(METHODS)} or "all"), one pair '
                             f'each, instead of --suite')
    parser.add_argument('--inputs', default='cls,det', help='cls, det or both')
    parser.add_argument('--modes', default='infer,train',
                        help='infer, train or both (default both)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="'cpu', 'cuda' or 'cuda:N' (default: cuda where available)")
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (default 2)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--reps', type=int, default=6)
    parser.add_argument('--cls-batch', type=int, default=None,
                        help='classification batch (default 8 on CPU, 64 on CUDA)')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory probes')
    parser.add_argument('--json', help='write the rows as JSON')
    parser.add_argument('--markdown', help='write the table as Markdown')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES),
                        help='run both models under autocast with this dtype (bf16 on CPU)')
    parser.add_argument('--a-cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override settings of model A only, e.g. '
                             'model.backbone.kw_cfg.recompute_kernels=True')
    parser.add_argument('--no-malloc-tuning', action='store_true',
                        help="keep glibc's default allocator policy (kw_mm/utils/allocator.py)")
    parser.add_argument('--same-process', action='store_true',
                        help='measure all pairs of a suite in this process (by default each '
                             'pair runs in a fresh one)')
    parser.add_argument('--onnx', action='store_true',
                        help='export both models to ONNX and time them in ONNX Runtime '
                             '(inference, classification input)')
    parser.add_argument('--onnx-batches', default='1,8',
                        help='--onnx: comma-separated batch sizes (default 1,8)')
    parser.add_argument('--onnx-levels', default='all,disable',
                        help='--onnx: ONNX Runtime graph optimisation levels, from '
                             f'{list(ORT_LEVELS)} (default all,disable: ORT_ENABLE_ALL and '
                             'ORT_DISABLE_ALL)')
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.onnx:
        onnx_batches, onnx_levels = parse_onnx_args(parser, args)
    torch.set_num_threads(args.threads)
    if args.no_malloc_tuning:  # also for the memory probes' subprocesses
        os.environ['KW_MM_MALLOC'] = '0'
    tuned = tune_cpu_allocator()
    if args.configs:
        if len(args.configs) != 2:
            parser.error('give exactly two configs (A and B), or none for the default suite')
        pairs = {'A vs B': tuple(args.configs)}
    elif args.methods:
        pairs = method_pairs(parser, args.methods)
    else:
        names = sorted(SUITES) if args.suite == 'all' else args.suite.split(',')
        unknown = [n for n in names if n not in PAIRS]
        if unknown:
            parser.error(f'--suite: unknown pair(s) {unknown}; choose from {sorted(SUITES)} '
                         f'(or a --methods pair such as resnet50:odconv4x)')
        pairs = {n: PAIRS[n] for n in names}
    kinds = args.inputs.split(',')
    if not set(kinds) <= set(INPUTS):
        parser.error(f'--inputs must be a comma-separated subset of {sorted(INPUTS)}')
    modes = tuple(m for m in MODES if m in args.modes.split(','))
    if not modes or not set(args.modes.split(',')) <= set(MODES):
        parser.error(f'--modes must be a comma-separated subset of {list(MODES)}, got '
                     f'{args.modes!r}')
    cls_batch = args.cls_batch or (64 if args.device.startswith('cuda') else 8)
    device_name = (torch.cuda.get_device_name() if args.device.startswith('cuda')
                   else f'CPU, {args.threads} threads')
    if not args.device.startswith('cuda'):
        from kw_mm import native
        settings = f'; native assembly kernels: {native.status()}'
    else:
        settings = ''
    settings += ''.join([f'; autocast {args.amp}' if args.amp else '',
                        f'; A with {args.a_cfg_options}' if args.a_cfg_options else ''])
    if args.onnx:
        import onnxruntime
        settings += f'; ONNX Runtime {onnxruntime.__version__}'
    print(f'# {device_name}; torch {torch.__version__}; heap allocator tuning: {tuned}'
          f'{settings}; ratio = throughput(A) / throughput(B)')
    print(HEADER)
    print('|' + '---|' * 9)
    if len(pairs) > 1 and not args.same_process:
        progress = RowProgress(len(pairs))
        rows = []
        for name in pairs:
            rows += run_isolated(name, argv)
            progress.update()
    elif args.onnx:
        rows = run_onnx(pairs, onnx_batches, onnx_levels, args.threads, args.warmup, args.reps,
                        options=(args.a_cfg_options, None))
    else:
        rows = run(pairs, kinds, args.device, args.warmup, args.reps, cls_batch,
                   not args.no_memory, args.a_cfg_options, args.amp, modes)
    summary = method_summary(rows) if args.methods else ''
    if summary:
        print('\n' + summary)
    if args.json:
        payload = json.dumps(dict(device=device_name, torch=torch.__version__, amp=args.amp,
                                  settings=settings.lstrip('; '),
                                  a_cfg_options=args.a_cfg_options, rows=rows), indent=1)
        write_atomically(args.json, lambda f: f.write(payload.encode()))
    if args.markdown:
        table = (f'Device: {device_name}{settings}\n\n{HEADER}\n|' + '---|' * 9 + '\n'
                 + '\n'.join(format_row(r) for r in rows) + '\n'
                 + (f'\n{summary}\n' if summary else ''))
        write_atomically(args.markdown, lambda f: f.write(table.encode()))


if __name__ == '__main__':
    main()
