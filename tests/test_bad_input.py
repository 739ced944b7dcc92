"""Bad input: each case raises before any work starts, with a message that names
the parameter, the value and what is allowed.

| case | input | expected message |
|---|---|---|
| budget not positive | KWConv2d(..., budget=0) | budget must be a positive finite number ..., got 0 |
| budget not a number | KWConv2d(..., budget='one') | budget must be a positive number ..., got 'one' |
| budget gives zero cells | 1×1 16→16 layer at b = 1/2, full-gcd cells | budget=0.5 gives zero cells ... at least 1/1 |
| channels do not partition | cell_in_ratio=0.25 over 6 input channels | cell_in_ratio=0.25 does not give a whole number of channels |
| groups do not divide | KWConv2d(6, 8, 3, groups=4) | ... must both be divisible by groups=4 |
| padding string unknown | KWConv2d(..., padding='bogus' / 'SAME' / 'full') | padding must be 'same', 'valid', ..., got 'bogus' |
| 'same' padding, strided | KWConv2d(..., padding='same', stride=2) | padding='same' needs stride 1 ..., got stride=(2, 2) |
| stride not positive | KWConv2d(..., stride=0) | stride must be a positive int ..., got 0 |
| dilation not positive | KWConv2d(..., dilation=(1, 0)) | dilation must be a positive int ..., got (1, 0) |
| padding negative | KWConv2d(..., padding=-1) | padding must be an int >= 0 ..., got -1 |
| layer τ out of range | KWConv2d(..., temperature=nan / -0.5 / 1.5) | temperature must be in [0, 1], got nan |
| attention width zero | KWConv2d(..., reduction=0) / (min_hidden=0) | reduction must be a positive finite number ..., got 0 |
| unknown layer option | KWConv2d(..., budgte=1) | KWConv2d() got unexpected keyword argument(s) ['budgte']; its KW options are [...] |
| unknown kw_cfg key (typo) | kw_cfg=dict(budgte=1) | kw_cfg has unknown key(s) ['budgte']; allowed keys are [...] |
| unknown sharing range | kw_cfg=dict(sharing='stages') | kw_cfg.sharing must be one of ('stage', 'block', 'layer', 'none'), got 'stages' |
| whole-kernel cells over mixed shapes | kw_cfg=dict(kernel_partition=False) | kernel_partition=False needs ... equal kernel shapes ..., got layer1.0.conv1: 64x64x3x3, ... |
| out_indices out of range | KWResNet(18, out_indices=(4,)) | out_indices entries must be ints in [-4, 3] ..., got 4 |
| frozen_stages out of range | KWResNet(18, frozen_stages=5) | frozen_stages must be an int in [-1, 4] ..., got 5 |
| unknown depth | KWResNet(19) | invalid depth 19 for KWResNet; choose from [18, 34, 50, 101, 152] |
| unknown arch | KWConvNeXt(arch='giant') | arch must be one of [...], got 'giant' |
| unknown layout | KWMobileNetV2(kw_layout='bad') | kw_layout must be None or one of (...), got 'bad' |
| τ out of range | set_temperature(model, 1.5) | temperature must be in [0, 1], got 1.5 |
| τ schedule length | KWTemperatureHook(epochs=0) | epochs must be a positive number ..., got epochs=0 |
| converter: another layout | tests/test_tools/test_convert.py | matches none of the known released models ... tensors did not match |
| converter: unreadable SRC, unwritable DST | tests/test_tools/test_convert_bad_input.py (table) | checkpoint SRC ... is truncated or corrupt ... (one line, exit 2) |
| checkpoint of another variant, any loading path | tests/test_checkpoint_variants.py (table) | ... holds ... kw1d4x_resnet18 ..., but this KWResNet is ... kw1x_resnet18 |
| init_cfg: another variant | tests/test_models/test_kw_resnet.py | init_cfg checkpoint ...: the checkpoint does not fit this KWResNet ... |
| dataset path missing | tests/test_tools/test_train_test_tools.py | dataset path(s) not found: ... data/coco/ |
"""
import pytest

from kw_mm import KWConv2d, set_temperature
from kw_mm.engine import KWTemperatureHook
from kw_mm.layers.partition import KernelShape, plan_warehouse
from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet

CASES = [
    ('budget not positive', lambda: KWConv2d(8, 8, 3, budget=0),
     r'budget must be a positive finite number .*got 0'),
    ('budget not a number', lambda: KWConv2d(8, 8, 3, budget='one'),
     r"budget must be a positive number .*got 'one'"),
    ('budget gives zero cells',
     lambda: plan_warehouse([KernelShape('a', 16, 16, (1, 1))], 0.5, 1, 1),
     r'budget=0\.5 gives zero cells .*at least 1/1'),
    ('channels do not partition',
     lambda: plan_warehouse([KernelShape('a', 8, 6, (3, 3))], 1, cell_in_ratio=0.25),
     r'cell_in_ratio=0\.25 does not give a whole number of channels'),
    ('groups do not divide', lambda: KWConv2d(6, 8, 3, groups=4),
     r'in_channels=6 and out_channels=8 must both be divisible by groups=4'),
    ('padding string unknown', lambda: KWConv2d(8, 8, 3, padding='bogus'),
     r"padding must be 'same', 'valid', an int >= 0 or a tuple of 2 such ints, got 'bogus'"),
    ('padding string upper case', lambda: KWConv2d(8, 8, 3, padding='SAME'),
     r"padding must be 'same', 'valid', .*got 'SAME'"),
    ('padding string full', lambda: KWConv2d(8, 8, 3, padding='full'),
     r"padding must be 'same', 'valid', .*got 'full'"),
    ("'same' padding, strided", lambda: KWConv2d(8, 8, 3, padding='same', stride=2),
     r"padding='same' needs stride 1 .*got stride=\(2, 2\)"),
    ('stride not positive', lambda: KWConv2d(8, 8, 3, stride=0),
     r'stride must be a positive int or a tuple of 2 such ints, got 0'),
    ('dilation not positive', lambda: KWConv2d(8, 8, 3, dilation=(1, 0)),
     r'dilation must be a positive int .*got \(1, 0\)'),
    ('padding negative', lambda: KWConv2d(8, 8, 3, padding=-1),
     r'padding must be an int >= 0 .*got -1'),
    ('layer temperature nan', lambda: KWConv2d(8, 8, 3, temperature=float('nan')),
     r'temperature must be in \[0, 1\], got nan'),
    ('layer temperature negative', lambda: KWConv2d(8, 8, 3, temperature=-0.5),
     r'temperature must be in \[0, 1\], got -0\.5'),
    ('layer temperature above 1', lambda: KWConv2d(8, 8, 3, temperature=1.5),
     r'temperature must be in \[0, 1\], got 1\.5'),
    ('attention reduction zero', lambda: KWConv2d(8, 8, 3, reduction=0, min_hidden=0),
     r'reduction must be a positive finite number .*got 0'),
    ('attention min_hidden zero', lambda: KWConv2d(8, 8, 3, min_hidden=0),
     r'min_hidden must be a positive int .*got 0'),
    ('unknown layer option', lambda: KWConv2d(8, 8, 3, budgte=1),
     r"KWConv2d\(\) got unexpected keyword argument\(s\) \['budgte'\]; its KW options are "
     r"\['budget'"),
    ('unknown kw_cfg key', lambda: KWResNet(18, kw_cfg=dict(budgte=1)),
     r"kw_cfg has unknown key\(s\) \['budgte'\]; allowed keys are \[.*'budget'"),
    ('unknown sharing range', lambda: KWResNet(18, kw_cfg=dict(sharing='stages')),
     r"kw_cfg.sharing must be one of \('stage', 'block', 'layer', 'none'\), got 'stages'"),
    ('whole-kernel cells over mixed shapes',
     lambda: KWResNet(18, kw_cfg=dict(kernel_partition=False)),
     r'kernel_partition=False needs .*equal kernel shapes.*got layer1\.0\.conv1: 64x64x3x3'),
    ('out_indices out of range', lambda: KWResNet(18, out_indices=(4, )),
     r'out_indices entries must be ints in \[-4, 3\].*got 4'),
    ('frozen_stages out of range', lambda: KWResNet(18, frozen_stages=5),
     r'frozen_stages must be an int in \[-1, 4\].*got 5'),
    ('unknown depth', lambda: KWResNet(19),
     r'invalid depth 19 for KWResNet; choose from \[18, 34, 50, 101, 152\]'),
    ('unknown arch', lambda: KWConvNeXt(arch='giant'), r"arch must be one of .*got 'giant'"),
    ('unknown layout', lambda: KWMobileNetV2(kw_layout='bad'),
     r"kw_layout must be None or one of .*got 'bad'"),
    ('temperature out of range', lambda: set_temperature(KWConv2d(8, 8, 1), 1.5),
     r'temperature must be in \[0, 1\], got 1\.5'),
    ('schedule length', lambda: KWTemperatureHook(epochs=0),
     r'epochs must be a positive number .*got epochs=0'),
]


@pytest.mark.parametrize('case,make,message', CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(case, make, message):
    with pytest.raises((ValueError, TypeError, KeyError), match=message):
        make()
