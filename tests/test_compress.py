"""prune / distill / qat: they really shrink, rebuild from plain data, quantize to INT8 kernels, and
reject bad input before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline import env, inference, onnxio, quant
from pipeline.artifacts import save_checkpoint
from pipeline.errors import PipelineError
from pipeline.inference import ort_quantize
from pipeline.models import apply_shapes, build_model, count_macs, module_shapes
from pipeline.runner import Runner, run_pipeline
from stages.export import requantized_note
from tests.conftest import ORT_BITS

R8 = {"name": "resnet8", "num_classes": 10, "width": 0.5}
SPEC = quant.QuantSpec("uint8", ORT_BITS, 0.01, ())
SPEC_FLOAT = quant.QuantSpec("uint8", ORT_BITS, 0.01, ("conv1", "layer1"))


@pytest.mark.parametrize("override,match", [
    ("prune.ratio=1.0", r"prune\.ratio: 1\.0 must be in \[0, 1\)"),
    ("prune.target_macs=1e12", r"prune\.target_macs: .* is not below the model's"),
    ("prune.exclude=[layer9.conv]", r"prune\.exclude: no layer named 'layer9.conv'"),
    ("prune.method=magnitude", None),
    ("distill.student=resnet999", r"distill\.student: unknown model"),
    ("distill.alpha=2", r"distill\.alpha"),
    ("qat.source=validate", r"qat\.source: 'validate' is not a model stage"),
    ("qat.weight_bits=4", r"qat\.weight_bits"),
    ("distill.feature_layers=[nope]", r"distill\.feature_layers: the student has no layer named 'nope'"),
    ("distill.feature_layers=[layer3:nope]", r"the teacher has no layer named 'nope'"),
    ("distill.feature_layers=[layer3]", None),
    ("model=mobilenet_v2", None),
    ("export.fp16=[qat]", r"export\.fp16: 'qat' is not an FP32 model stage of the pipeline"),
    ("export.fp16=[distill]", None),
    ("qat.float_layers=[mesure]", r"qat\.float_layers: no layer named 'mesure'.*, or the tokens auto and measure"),
    ("qat.float_layers=[conv1,layer1,layer2,layer3,fc]", r"qat\.float_layers: .* keeps every conv/linear in FP32"),
    ("qat.float_layers=[conv1,layer1]", None),
    ("prune.drop_blocks=[layer2.0]", r"prune\.drop_blocks: 'layer2\.0' changes the tensor shape \(\[1, 8, 32, 32\]"),
    ("prune.drop_blocks=[layer9]", r"prune\.drop_blocks: no layer named 'layer9'"),
    ("prune.drop_blocks=[layer1.0]", None),
])
def test_bad_compression_settings_fail_before_training(cfg_factory, tmp_path, override, match):
    cfg = cfg_factory(override)
    if match is None:
        Runner(cfg, tmp_path)
    else:
        with pytest.raises(PipelineError, match=match):
            Runner(cfg, tmp_path)


def test_teacher_checkpoint_that_does_not_fit(cfg_factory, tmp_path):
    other = build_model({**R8, "num_classes": 5})
    save_checkpoint(tmp_path / "t5.pt", other.state_dict(), {**R8, "num_classes": 5})
    with pytest.raises(PipelineError, match="predicts 5 classes"):
        Runner(cfg_factory(f"distill.teacher={tmp_path}/t5.pt"), tmp_path)
    bad = build_model(R8).state_dict()
    save_checkpoint(tmp_path / "bad.pt", bad, {**R8, "name": "resnet20"})
    with pytest.raises(PipelineError, match="distill.teacher: .*does not fit model resnet20"):
        Runner(cfg_factory(f"distill.teacher={tmp_path}/bad.pt"), tmp_path)


def test_ops_without_int8_kernels_stay_float_and_are_listed(tmp_path):
    """GELU has no INT8 kernel in ORT: it runs float between DQ and Q, listed by op, the convs in INT8."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.GELU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    gm = quant.prepare_qat(model, SPEC)
    assert quant.float_ops(gm) == {"GELU (no INT8 kernel in ONNX Runtime)": ["_2"]}
    x = torch.randn(8, 3, 32, 32)
    quant.calibrate(gm, [(x, None)])
    gm.eval()
    onnxio.export_onnx(quant.to_deploy(gm), x[:2], tmp_path / "q.onnx", 18, quant.onnx_translations())
    cov = inference.get().kernel_coverage(tmp_path / "q.onnx")
    assert cov["int8_kernels"] == len(quant.quantized_layers(gm)) == 3 and cov["float_kernels"] == 0, cov


class _ReadsItsWeight(torch.nn.Module):
    """EdgeNeXt's positional encoding: the forward code reads a conv's weight (its dtype) besides calling it."""

    def __init__(self):
        super().__init__()
        self.conv, self.proj = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.conv(x).to(self.proj.weight.dtype))
        return self.head(y.mean((2, 3)))


def test_a_layer_whose_weight_the_code_reads_stays_float(tmp_path):
    gm = quant.prepare_qat(_ReadsItsWeight().eval(), SPEC)
    assert ["proj"] in quant.float_ops(gm).values()  # with its .to(dtype)
    x = torch.randn(8, 3, 32, 32)
    quant.calibrate(gm, [(x, None)])  # crashed: the quantized replacement has no .weight
    gm.eval()
    onnxio.export_onnx(quant.to_deploy(gm), x[:2], tmp_path / "q.onnx", 18, quant.onnx_translations())
    # ORT quantizes the lone float conv between DequantizeLinear and QuantizeLinear itself (per tensor)
    assert inference.get().kernel_coverage(tmp_path / "q.onnx")["int8_kernels"] >= len(quant.quantized_layers(gm)) == 2


def test_a_model_that_does_not_run_at_the_input_size_is_one_line_naming_the_layer(capsys):
    """torch.fx's shape propagation prints a traceback before it raises: the error is one line, no traceback."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 5)).eval()
    with pytest.raises(PipelineError, match=r"does not run on a 6x6 input in '2' \(RuntimeError: Calculated padded "
                                            r"input size .*\); check data.image_size$"):
        quant.prepare_qat(model, SPEC, 6)
    assert capsys.readouterr().err == ""


def test_qat_with_a_zero_batch_norm_weight_stays_finite_and_learns_it():
    """timm zero-initialises the last BN of a residual block: QAT with live BN divided by that zero (NaN)."""
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight[:4] = 0
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bn).eval()
    gm = quant.prepare_qat(model, SPEC, 8)
    gm.train()
    (gm(torch.randn(4, 3, 8, 8)) * torch.randn(4, 8, 6, 6)).sum().backward()
    grad = gm.get_submodule("0").bn.weight.grad
    assert torch.isfinite(grad).all() and (grad[:4] != 0).all()


def test_tensorflow_same_padding_is_fixed_for_the_input_size_and_runs_on_int8_kernels(tmp_path):
    """timm's tf_* layers pad 'SAME' from the input size on every call, which fx cannot trace: they become a
    fixed pad (one more row/column after than before at stride 2) folded into QLinearConv; the SAME max-pool
    stays float. The QAT form computes what the float model does before calibration."""
    import sys

    import numpy as np
    import timm.layers  # noqa: F401

    conv_same = sys.modules["timm.layers.conv2d_same"].Conv2dSame
    pool_same = sys.modules["timm.layers.pool2d_same"].MaxPool2dSame
    torch.manual_seed(0)
    model = torch.nn.Sequential(conv_same(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                conv_same(8, 8, 5, stride=2, groups=8), torch.nn.ReLU(), pool_same(3, 2),
                                conv_same(8, 16, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10)).eval()
    x = torch.randn(16, 3, 32, 32)
    gm = quant.prepare_qat(model, SPEC, 32)
    assert [n for n, m in gm.named_modules() if isinstance(m, quant.SamePadConv2d)] == ["0.conv", "3.conv", "6.conv"]
    assert gm.get_submodule("0.conv").same_pad == (0, 1, 0, 1) and gm.get_submodule("6.conv").same_pad == (1, 1, 1, 1)
    with torch.no_grad():  # observers off, weights on their INT8 grid: close to the float model
        torch.testing.assert_close(gm(x), model(x), atol=0.05, rtol=0.05)
    assert set(quant.float_ops(gm)) == {"_SamePadPool (no INT8 kernel in ONNX Runtime)"}
    dep, ops = _calibrated_export(gm, x, tmp_path, opt_level="extended")
    assert ops["QLinearConv"] == 3 and ops["Pad"] == 1 and "Conv" not in ops, ops  # the one Pad: the pool's -inf
    with torch.no_grad():
        want = dep(x).numpy()
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


class _PadsBeforeConvs(torch.nn.Module):
    """HGNetV2's stem: an explicit zero pad (one row and column after) before a conv; and a ZeroPad2d."""

    def __init__(self):
        super().__init__()
        self.a, self.pad, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ZeroPad2d(1), torch.nn.Conv2d(8, 8, 3)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.b(self.pad(torch.relu(self.a(torch.nn.functional.pad(x, (0, 1, 0, 1))))))
        return self.head(torch.relu(x).mean((2, 3)))


def test_a_zero_pad_before_a_conv_becomes_part_of_it(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    model = _PadsBeforeConvs().eval()
    gm = quant.prepare_qat(model, SPEC, 8)
    assert gm.get_submodule("a.conv").same_pad == (1, 2, 1, 2) and gm.get_submodule("b.conv").same_pad == (1,) * 4
    assert quant.float_ops(gm) == {}
    x = torch.randn(16, 3, 8, 8)
    dep, ops = _calibrated_export(gm, x, tmp_path, opt_level="extended")
    assert ops["QLinearConv"] == 2 and "Pad" not in ops, ops
    with torch.no_grad():
        want = dep(x).numpy()
        torch.testing.assert_close(gm(x), model(x), atol=0.1, rtol=0.1)
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def _calibrated_export(gm, x: torch.Tensor, tmp_path, opt_level: str = "all"):
    """Calibrate on ``x``, export the deploy form to ``q.onnx``; returns it and ORT's optimised op counts."""
    quant.calibrate(gm, [(x, None)])
    gm.eval()
    dep = quant.to_deploy(gm)
    onnxio.export_onnx(dep, x[:2], tmp_path / "q.onnx", 18, quant.onnx_translations())
    inference.get().session(tmp_path / "q.onnx", 1, opt_level=opt_level, optimized_path=tmp_path / "o.onnx")
    return dep, onnxio.op_counts(tmp_path / "o.onnx")


def _all_int8_export(make, tmp_path) -> tuple:
    """A 16 px model from ``make()`` prepared (nothing may stay float), calibrated and exported; returns ORT's
    optimised op counts, ORT's largest difference from the PyTorch export form and the export form's from the
    float model, both relative to the largest output."""
    import numpy as np

    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(8, 3, 16, 16)
    gm = quant.prepare_qat(model, SPEC, 16)
    assert quant.float_ops(gm) == {}
    dep, ops = _calibrated_export(gm, x, tmp_path, opt_level="extended")
    assert onnxio.dequantized_ops(tmp_path / "o.onnx") == {}  # ORT runs nothing float on dequantized data
    with torch.no_grad():
        want, ref = dep(x).numpy(), model(x).numpy()
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    return ops, np.abs(got - want).max() / np.abs(want).max(), np.abs(want - ref).max() / np.abs(ref).max()


class _StarReluScaled(torch.nn.Module):
    """MetaFormer's StarReLU (``scale * relu(x) ** 2 + bias``, both parameters) and a layer scale (``x * gamma``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 16, 3)
        self.scale, self.bias = torch.nn.Parameter(torch.tensor([0.8])), torch.nn.Parameter(torch.tensor([0.1]))
        self.gamma = torch.nn.Parameter(torch.rand(16, 1, 1))

    def forward(self, x):
        y = self.scale * torch.relu(self.a(x)) ** 2 + self.bias
        return self.b(y * self.gamma)


def test_parameters_an_op_reads_and_squares_run_on_int8_kernels(tmp_path):
    """A parameter read by an Add or Mul gets its own quantizer (ORT left such a Mul float between
    DequantizeLinear and QuantizeLinear, unreported), and x ** 2 becomes x * x: all INT8, as PyTorch computes."""
    ops, ort_err, _ = _all_int8_export(_StarReluScaled, tmp_path)
    assert ops["QLinearMul"] == 3 and ops["QLinearAdd"] == 1 and not {"Mul", "Add", "Pow"} & set(ops), ops
    assert ort_err <= 1e-3


class _SharedConv(torch.nn.Module):
    """One conv called twice, on inputs of different scales (CoaT's shared position encodings)."""

    def __init__(self):
        super().__init__()
        self.stem, self.shared = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.shared.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.shared(self.shared(torch.relu(self.stem(x))))


def test_a_conv_called_twice_gets_each_calls_input_scale_for_its_bias(tmp_path):
    """Each call of a shared conv quantizes its INT32 bias on that call's input scale: ORT fuses both calls into
    QLinearConv and computes what PyTorch does (one bias scale for both left one call float in ORT)."""
    ops, ort_err, _ = _all_int8_export(_SharedConv, tmp_path)
    assert ops["QLinearConv"] == 3 and "Conv" not in ops, ops
    assert ort_err <= 1e-3
    gm = quant.prepare_qat(_SharedConv().eval(), SPEC, 16)
    assert quant.quantized_layers(gm) == ["stem", "shared"]
    calls = quant.quantized_layers(gm, calls=True)  # what export compares ORT's INT8 kernels with
    assert calls == ["stem", "shared", "shared_call2"]
    assert inference.get().kernel_coverage(tmp_path / "q.onnx")["int8_kernels"] == len(calls)


class _ClassToken(torch.nn.Module):
    """A class token far smaller than the image tokens it joins, a residual (one scale for all tokens), then
    LayerNorm (CoaT): quantized, the class token's row is constant."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.cls = torch.nn.Parameter(torch.linspace(-0.2, 0.2, 16).view(1, 1, 16))
        self.proj, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16, eps=1e-6)
        self.head, self.skip = torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.stem.weight.mul_(100)

    def forward(self, x):
        tokens = torch.cat((self.cls.expand(x.shape[0], -1, -1), self.stem(x).flatten(2).transpose(1, 2)), dim=1)
        tokens = tokens + self.proj(tokens)
        return self.head(self.norm(tokens)[:, 0]) + self.skip(tokens[:, 0])  # skip: the residual is quantized


def test_a_norm_on_a_quantized_row_it_flattens_keeps_its_float_gradient(tmp_path):
    """LayerNorm of a row quantization left constant has a gradient of 1 / sqrt(eps) there, and QAT diverged
    (CoaT: loss nan in its first epoch). Its gradient now comes from the unquantized input; the export form
    and ONNX keep the norm of the quantized input alone."""
    torch.manual_seed(0)
    model = _ClassToken()
    x = torch.randn(8, 3, 16, 16)
    gm = quant.prepare_qat(model, SPEC, 16)
    dep, ops = _calibrated_export(gm, x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), gm(x))
    assert not [m for m in dep.modules() if isinstance(m, quant.NormGrad)]
    assert ops["LayerNormalization"] == 1, ops
    grads = []
    for m in (model, gm.train()):
        m.zero_grad()
        m(x).square().sum().backward()
        grads.append(model.cls.grad.norm().item())
    assert grads[1] <= 2 * grads[0], grads  # 87x the float model's before


class _WritesInPlace(torch.nn.Module):
    """A float op's output read by a conv, then written in place (``mul_``), then read by another conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (torch.nn.Conv2d(c, 8, 3) for c in (3, 8, 8))

    def forward(self, x):
        z = F.gelu(self.c1(x))
        before = self.c3(z)
        z.mul_(2)
        return self.c2(z) + before


def test_a_tensor_written_in_place_is_quantized_after_the_write(tmp_path):
    """The users after an in-place write read the written tensor through a quantizer placed after the write
    (the quantizer placed after the tensor, before the write, gave them the unwritten values once
    calibrated: the INT8 model computed another function than the float one, silently)."""
    torch.manual_seed(0)
    model = _WritesInPlace().eval()
    x = torch.randn(8, 3, 16, 16)
    gm = quant.prepare_qat(model, SPEC, 16)
    dep, ops = _calibrated_export(gm, x, tmp_path)
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    ort = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert abs(ort - want.numpy()).max() <= 0.05 * want.abs().max().item()


class _ParameterMatmul(torch.nn.Module):
    """Tokens times a 2-D parameter (SwiftFormer's additive attention: ``query @ self.w_g``)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.w = torch.nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        return (self.stem(x).flatten(2).transpose(1, 2) @ self.w).mean(1)


def test_a_matmul_with_a_parameter_is_a_quantized_linear(tmp_path):
    """``x @ w`` with a parameter ``w`` becomes a linear layer holding ``w.T``: INT8 in ORT (a float MatMul between
    DequantizeLinear and QuantizeLinear before), computing what PyTorch does."""
    ops, ort_err, float_err = _all_int8_export(_ParameterMatmul, tmp_path)
    assert "MatMul" not in ops and ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) == 1, ops
    assert ort_err <= 1e-3 and float_err <= 0.05


class _SplitAttention(torch.nn.Module):
    """ResNeSt's split attention (radix 2: a sum over the splits, a softmax across them, the weighted sum) and
    SKNet's stacked branches (``torch.stack`` then the same)."""

    def __init__(self, stack: bool):
        super().__init__()
        self.stack = stack
        self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2, self.conv3 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(3, 16, 5, padding=2)
        self.fc1, self.fc2 = torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 32, 1)
        self.out, self.pool = torch.nn.Conv2d(16, 8, 1), torch.nn.AdaptiveAvgPool2d(1)  # a classifier's head

    def forward(self, x):
        b = x.shape[0]
        if self.stack:
            x = torch.stack([torch.relu(self.conv2(x)), torch.relu(self.conv3(x))], dim=1)
        else:
            x = torch.relu(self.conv(x)).reshape(b, 2, 16, x.shape[2], x.shape[3])
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(torch.relu(self.fc1(gap))).view(b, 2, 16).softmax(dim=1)
        return self.pool(self.out((x * attn.reshape(b, 2, 16, 1, 1)).sum(dim=1))).flatten(1)


@pytest.mark.parametrize("stack", [False, True], ids=["resnest", "sknet"])
def test_split_attention_sums_and_stacks_run_on_int8_kernels(stack, tmp_path):
    """A sum over 2 splits becomes one add of two slices (QLinearAdd; ORT has no INT8 ReduceSum, and the Mul
    before it stayed float too), a stack a concatenation (QLinearConcat), and the reshape of the softmax keeps
    its 1/256 grid: nothing runs float between DequantizeLinear and QuantizeLinear, as PyTorch computes."""
    ops, ort_err, float_err = _all_int8_export(lambda: _SplitAttention(stack), tmp_path)
    assert ops["QLinearAdd"] == 2 and ops["QLinearMul"] == 1, ops
    assert not {"ReduceSum", "Mul", "Add", "Concat", "Conv", "ReduceMean"} & set(ops), ops
    assert ops.get("QLinearConcat", 0) == stack, ops
    assert ort_err <= 0.01  # a step of the last quantizer at most
    assert float_err <= 0.1  # and the INT8 model still computes the float one


class _Eca(torch.nn.Module):
    """ECA's channel gate: a Conv1d across the pooled channels, a sigmoid, ``x * gate.expand_as(x)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.head, self.pool = torch.nn.Conv2d(16, 8, 1), torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        y = self.gate(x.mean((2, 3)).view(x.shape[0], 1, -1)).sigmoid().view(x.shape[0], -1, 1, 1)
        return self.pool(self.head(x * y.expand_as(x))).flatten(1)


def test_eca_gate_conv1d_and_expand_run_on_int8_kernels(tmp_path):
    """ECA's Conv1d is a QLinearConv (it ran float between DequantizeLinear and QuantizeLinear), and the
    ``expand_as`` before the gate's Mul is dropped (the Mul broadcasts; ORT ran a float Expand of the map)."""
    ops, ort_err, float_err = _all_int8_export(_Eca, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearMul"] == 1, ops
    assert not {"Conv", "Expand", "Mul"} & set(ops), ops
    assert ort_err <= 0.01 and float_err <= 0.1


class _Scalars(torch.nn.Module):
    """Python numbers in Adds and Muls of quantized tensors (attention's ``q * scale``, ``x / 4``, ``x - 1``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        return self.c(0.5 * x + self.b(x) / 4 - 1)


def test_python_numbers_in_adds_and_muls_run_on_int8_kernels(tmp_path):
    """A number an Add or Mul reads becomes a constant with its own quantizer (a division a Mul by 1 / c, a
    subtraction an Add of -c), so ORT runs QLinearMul / QLinearAdd; with a float initializer it ran them float
    between DequantizeLinear and QuantizeLinear (MobileNetV4-Hybrid's and EfficientViT-M's ``q * scale``)."""
    ops, ort_err, float_err = _all_int8_export(_Scalars, tmp_path)
    assert ops["QLinearMul"] == 2 and ops["QLinearAdd"] == 2 and not {"Mul", "Add", "Div", "Sub"} & set(ops), ops
    assert ort_err <= 0.01 and float_err <= 0.1


class _DropoutHead(torch.nn.Module):
    """timm's heads with ``drop_rate`` (EfficientNet, ResNet, MobileNetV3, GhostNet): ``F.dropout`` before the
    classifier."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16, 8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.head(F.dropout(x, p=0.2, training=self.training))


def test_a_classifier_behind_functional_dropout_runs_on_int8_kernels(tmp_path):
    """The classifier finds its input's quantizer through ``F.dropout`` (an identity in eval), so its bias is
    INT32 on that scale and ORT fuses a QGemm (with a float bias it ran a float Gemm on dequantized data)."""
    ops, ort_err, _ = _all_int8_export(_DropoutHead, tmp_path)
    assert ops["QGemm"] == 1 and "Gemm" not in ops, ops
    assert ort_err <= 0.01


class _BlurPool(torch.nn.Module):
    """TResNet's anti-aliased downsampling (timm's BlurPool2d: a reflect pad, then ``F.conv2d`` with a fixed
    binomial filter in a buffer) and a squeeze-excitation written as ``x.mean((2, 3))`` (no AdaptiveAvgPool2d)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Linear(16, 8)
        self.register_buffer("filt", (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16)
                             .repeat(16, 1, 1, 1), persistent=False)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), self.filt, stride=2, groups=16)
        return self.head(x.mean((2, 3)))


def test_blur_pool_and_spatial_means_run_on_int8_kernels(tmp_path):
    """The fixed blur filter becomes a conv module (a QLinearConv, not a float Conv between DequantizeLinear and
    QuantizeLinear; it stays fixed in QAT), the reflect pad keeps its input's grid, and a mean over H, W exports
    as GlobalAveragePool (QLinearGlobalAveragePool) in any model, not only in those with an AdaptiveAvgPool2d."""
    import numpy as np

    torch.manual_seed(0)
    model = _BlurPool().eval()
    gm = quant.prepare_qat(model, SPEC, 16)
    assert quant.float_ops(gm) == {}
    blur = [m for m in gm.modules() if isinstance(m, quant.QConvBn) and m.conv.groups == 16]
    assert len(blur) == 1 and not blur[0].conv.weight.requires_grad
    x = torch.randn(8, 3, 16, 16)
    dep, ops = _calibrated_export(gm, x, tmp_path, opt_level="extended")
    assert ops["QLinearConv"] == 2 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert not {"Conv", "ReduceMean"} & set(ops), ops
    assert onnxio.dequantized_ops(tmp_path / "o.onnx") == {"Pad": 1}  # ORT has no INT8 reflect pad
    with torch.no_grad():
        want, ref = dep(x).numpy(), model(x).numpy()
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max() and np.abs(want - ref).max() <= 0.1 * np.abs(ref).max()


def test_hardswish_and_hardsigmoid_run_on_int8_kernels(tmp_path):
    """MobileNetV3: Hardswish = QLinearAdd (x + an INT8 3) + QLinearMul, the ReLU6 clip and the /6 in the
    requantization; an SE gate's Hardsigmoid folds into its conv (bias + 3, ReLU6, /6). Nothing stays
    float, ORT leaves no DequantizeLinear, and it computes what PyTorch's export form computes."""
    import numpy as np

    torch.manual_seed(0)
    model = build_model({"name": "mobilenet_v3_small", "num_classes": 10}).eval()
    for m in model.modules():  # spread the BN statistics so the activations are not all in one bin
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
    gm = quant.prepare_qat(model, SPEC)
    assert quant.float_ops(gm) == {}
    hs = [m for m in gm.modules() if isinstance(m, quant.QHardSwish)]
    assert len(hs) == 19 and not any(m.gate_only for m in hs)  # the 9 SE gates went into their convs
    assert sum(isinstance(m, quant.QConvBn) and m.shift == 3.0 for m in gm.modules()) == 9
    x = torch.randn(16, 3, 32, 32)
    dep, ops = _calibrated_export(gm, x, tmp_path)
    with torch.no_grad():
        ref, fq, fl = dep(x).numpy(), gm(x).numpy(), model(x).numpy()
    assert np.abs(ref - fq).max() <= 1e-3 * np.abs(ref).max()  # export form == QAT form
    assert np.corrcoef(ref.ravel(), fl.ravel())[0, 1] > 0.9  # and both still approximate the float model
    assert ops["QLinearMul"] == 19 + 9 and ops["DequantizeLinear"] == 0, ops  # Hardswish x19, SE x9
    assert not {"HardSwish", "HardSigmoid", "Clip", "Add", "Mul", "Conv"} & set(ops), ops
    out = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max(), (np.abs(out - ref).max(), np.abs(ref).max())
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(fq), rtol=0.05, atol=0.05)


def test_quantized_checkpoint_that_does_not_fit_says_what_to_do(tmp_path):
    """A QAT checkpoint whose layers were quantized differently (an older pipeline's) is one line."""
    import dataclasses

    from pipeline.artifacts import load_checkpoint

    cfg = {"name": "resnet8", "num_classes": 10}
    gm = quant.prepare_qat(build_model(cfg).eval(), SPEC)
    state = {k: v for k, v in gm.state_dict().items() if "act_quant_0." not in k}  # one observer fewer
    save_checkpoint(tmp_path / "model.pt", state, cfg, shapes={}, extra={"quant": dataclasses.asdict(SPEC)})
    with pytest.raises(PipelineError, match="does not fit its model .*delete its folder to run qat again"):
        quant.load_quantized(load_checkpoint(tmp_path / "model.pt"), str(tmp_path / "model.pt"), None)


def test_empty_calibration_set():
    gm = quant.prepare_qat(build_model(R8), SPEC)
    with pytest.raises(PipelineError, match="calibration set is empty"):
        quant.calibrate(gm, [])


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "mobilenet_v2"])
def test_qat_export_runs_on_int8_kernels(tmp_path, name):
    torch.manual_seed(0)
    model = build_model({"name": name, "num_classes": 10, "width": 0.5}).eval()
    x = torch.randn(16, 3, 32, 32)
    gm = quant.prepare_qat(model, SPEC)
    quant.calibrate(gm, [(x, None)])
    gm.eval()
    onnxio.export_onnx(quant.to_deploy(gm), x[:2], tmp_path / "q.onnx", 18, quant.onnx_translations())
    cov = inference.get().kernel_coverage(tmp_path / "q.onnx")
    assert cov["float_kernels"] == 0 and cov["int8_kernels"] > 0, cov
    got = inference.predict(inference.get().session(tmp_path / "q.onnx"), x.numpy())
    ref = gm(x).detach().numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_float_layers_stay_fp32_and_the_rest_runs_int8(tmp_path):
    torch.manual_seed(0)
    model = build_model(R8).eval()
    x = torch.randn(16, 3, 32, 32)
    gm = quant.prepare_qat(model, SPEC_FLOAT)
    quantized = quant.quantized_layers(gm)
    assert quantized and not any(n.startswith(("conv1", "layer1")) for n in quantized), quantized
    assert isinstance(gm.get_submodule("layer1.0.conv1"), torch.nn.Conv2d)
    quant.calibrate(gm, [(x, None)])
    gm.eval()
    onnxio.export_onnx(quant.to_deploy(gm), x[:2], tmp_path / "q.onnx", 18, quant.onnx_translations())
    cov = inference.get().kernel_coverage(tmp_path / "q.onnx")
    n_float = sum(isinstance(m, torch.nn.Conv2d) and n.startswith(("conv1", "layer1"))
                  for n, m in model.named_modules())
    assert cov["int8_kernels"] == len(quantized) and cov["float_kernels"] == n_float > 0, cov
    got = inference.predict(inference.get().session(tmp_path / "q.onnx"), x.numpy())
    assert (got.argmax(1) == gm(x).detach().numpy().argmax(1)).mean() >= 0.9


def test_dropped_blocks_are_rebuilt_from_the_recorded_shapes():
    from pipeline.pruning import drop_blocks

    cfg = {"name": "resnet20", "num_classes": 10, "width": 0.5}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    drop_blocks(model, ["layer1.1", "layer1.2"])
    assert count_macs(model, 32) < count_macs(build_model(cfg), 32)
    fresh = apply_shapes(build_model(cfg), module_shapes(model))
    fresh.load_state_dict(model.state_dict())  # strict: the dropped blocks' weights are gone on both sides
    assert isinstance(fresh.layer1[1], torch.nn.Identity) and isinstance(fresh.layer1[2], torch.nn.Identity)
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_target_macs_is_met_closely_despite_round_to():
    """round_to=8 takes every layer down a multiple at the first pruner step (16 -> 8 channels): ResNet-56
    went from 1.26e8 straight to 4.8e7 MACs for a 5.9e7 target. The last step now stops at the target."""
    from pipeline.pruning import ChannelPlan, channel_prune

    model = build_model({"name": "resnet56", "num_classes": 10})
    plan = ChannelPlan(ratio=0.0, target_macs=5.9e7, importance="l1", global_pruning=False, keep_first_conv=True,
                       exclude=[], steps=1, step_epochs=0, round_to=8, whole_heads=False)
    channel_prune(model, plan, 32)
    assert 0.9 * 5.9e7 < count_macs(model, 32) <= 5.9e7
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


class _PartialResidual(torch.nn.Module):
    """timm's RexNet block: the input added to the first channels of a wider output."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin = cin
        self.body = torch.nn.Sequential(torch.nn.Conv2d(cin, 2 * cin, 1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(2 * cin, cout, 1), torch.nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return torch.cat([y[:, : self.cin] + x, y[:, self.cin :]], 1)


class _FixedWidth(torch.nn.Module):
    """Reads the width it was built for (as MixNet's split sizes do): fails once its input is narrower."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.width:
            raise RuntimeError(f"expected {self.width} channels, got {x.shape[1]}")
        return x


class _Unprunable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = torch.nn.Sequential(_PartialResidual(16, 24), _PartialResidual(24, 32), _PartialResidual(32, 40))
        self.mid = torch.nn.Conv2d(40, 32, 1)
        self.fixed = _FixedWidth(32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fixed(self.mid(self.blocks(self.stem(x)))).mean((2, 3)))


class _Ghost(torch.nn.Module):
    """GhostNet's module: a cheap depthwise half computed from the primary half, concatenated."""

    def __init__(self, c: int):
        super().__init__()
        self.primary = torch.nn.Conv2d(c, c // 2, 1)
        self.cheap = torch.nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)


class _GhostNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = torch.nn.ModuleList([_Ghost(32), _Ghost(32)])
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)  # as GhostNet's shortcut convs
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = x + b(x)  # residuals tie every ghost half to the stem's channels
        return self.head(self.dw(x).mean((2, 3)))


def test_ghost_modules_lose_the_share_the_ratio_says():
    """Each chosen channel of a ghost module's output removes its twin in the cheap half; Torch-Pruning's
    groups removed twice the ratio's share (the stem 32 -> 12 at ratio 0.3; ghostnet_100's 16 -> 2)."""
    from pipeline.pruning import ChannelPlan, channel_prune

    torch.manual_seed(0)
    model = _GhostNet().eval()
    x = torch.randn(2, 3, 8, 8)
    channel_prune(model, ChannelPlan(0.3, None, "l1", False, False, [], 1, 0, None, False), 8)
    assert model.stem.out_channels == 22 and model.blocks[0].primary.out_channels == 11  # 10 of 32 removed
    fresh = apply_shapes(_GhostNet(), module_shapes(model))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))


class _CrossStage(torch.nn.Module):
    """A CSP stage (timm's cs3darknet): one half of a split feeds a block's conv and its shortcut, the other
    goes to the concatenation; the split follows the block's width."""

    def __init__(self, sizes: bool):
        super().__init__()
        self.sizes = sizes  # split by a list of sizes, else by one size (the last part the rest)
        self.exp, self.trans = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)
        self.block = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.exp(x)
        w = self.block.in_channels
        a, b = x.split([w, x.shape[1] - w] if self.sizes else w, dim=1)
        return self.trans(torch.cat([b, a + self.block(a)], 1))


@pytest.mark.parametrize("sizes", [True, False], ids=["sizes", "one_size"])
def test_a_split_part_with_two_users_prunes_its_own_channels(sizes):
    """Torch-Pruning gave a split's i-th user the i-th part: with the block's conv and its shortcut both reading
    part 0, the concatenation got part 1's offset (split by one size, the analysis counted three parts and
    failed). Channels made dead before pruning leave the outputs unchanged only where each user gets its own
    part: one of part 0 (block, shortcut, the concatenation's second half), one of part 1 (its first half)."""
    import torch_pruning as tp

    from pipeline.pruning import _analysable

    torch.manual_seed(0)
    model, x = _CrossStage(sizes).eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        if sizes:  # channel 1 of part 0
            model.exp.weight[1] = model.exp.bias[1] = model.block.weight[1] = model.block.bias[1] = 0
            model.trans.weight[:, 4 + 1] = 0
        else:  # channel 1 of part 1 (exp's channel 5): the split's sizes stay 4 and the rest
            model.exp.weight[5] = model.exp.bias[5] = model.trans.weight[:, 1] = 0
        before = model(x)
    with _analysable():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        layer, idxs = (model.block, [1]) if sizes else (model.exp, [5])
        graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, idxs=idxs).prune()
    assert (model.exp.out_channels, model.block.out_channels, model.trans.in_channels) == (7, 3 if sizes else 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_check_prune_finds_groups_that_name_the_wrong_channels(monkeypatch):
    """``check_prune`` zeroes a group's channels, prunes the group and compares the outputs: a CSP stage checks
    out; with Torch-Pruning's own split mapping (the users in the order met) no group does."""
    import pipeline.pruning
    from pipeline.tools.check_prune import check_model

    torch.manual_seed(0)
    model = _CrossStage(sizes=True).eval()
    model.exp = torch.nn.Conv2d(3, 16, 1)  # parts of 8: the layers checked are exp and block
    model.block, model.trans = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(16, 4, 1)
    checked = check_model(model, 8, skip_kept=False)
    assert (checked.ok, checked.bad) == (2, []), checked.line()
    monkeypatch.setattr(pipeline.pruning, "_split_and_concat_mapping", lambda: [])
    old = check_model(model, 8, skip_kept=False)  # the wrong channels: the pruned stage no longer runs
    assert (old.ok, [b.split()[0] for b in old.breaks]) == (0, ["exp", "block"]), old.line()


class _Roll(torch.nn.Module):
    """Moves every channel one place on: an op Torch-Pruning takes for element-wise (channel i stays i)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=1)


def test_trial_prune_keeps_a_layer_whose_group_names_other_channels():
    """A group that maps channels wrongly, yet leaves a model that runs, is caught by the trial prune: the
    channels it names are zeroed first, so removing them must not change the outputs; here it does."""
    from pipeline.pruning import ChannelPlan, channel_prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _Roll(), torch.nn.Conv2d(8, 4, 1)).eval()
    notes: dict[str, str] = {}
    channel_prune(model, ChannelPlan(0.5, None, "l1", False, False, ["2"], 1, 0, None, False), 8, kept_notes=notes)
    assert notes == {"0": "Torch-Pruning's group for it names other channels than it removes"}
    assert model[0].out_channels == 8


def test_a_group_search_that_fails_keeps_its_layer(monkeypatch):
    """Torch-Pruning's group search raising on a layer (Hiera: a zero head size in its index mapping) keeps that
    layer with a note; the rest is pruned (it stopped channel pruning with a traceback)."""
    from torch_pruning.dependency.graph import DependencyGraph

    from pipeline.pruning import ChannelPlan, channel_prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    search = DependencyGraph.get_pruning_group

    def failing(self, module, *args, **kwargs):
        if module is model[0]:
            raise ZeroDivisionError("integer division or modulo by zero")
        return search(self, module, *args, **kwargs)

    monkeypatch.setattr(DependencyGraph, "get_pruning_group", failing)
    notes: dict[str, str] = {}
    channel_prune(model, ChannelPlan(0.5, None, "l1", False, False, ["4"], 1, 0, None, False), 8, kept_notes=notes)
    assert notes == {"0": "Torch-Pruning's dependency search fails (ZeroDivisionError)"}
    assert (model[0].out_channels, model[2].out_channels) == (8, 4)


def test_layers_torch_pruning_cannot_prune_are_kept_with_a_note(caplog):
    """Torch-Pruning loops forever on RexNet's partial residuals, cuts a channel slice at its traced bounds, and
    cannot know a width a module stored: those layers keep their channels, the rest is pruned, nothing hangs."""
    from pipeline.pruning import ChannelPlan, channel_prune

    torch.manual_seed(0)
    model, x = _Unprunable().eval(), torch.randn(2, 3, 8, 8)
    notes: dict[str, str] = {}
    with caplog.at_level("INFO", logger="pipeline.pruning"):
        channel_prune(model, ChannelPlan(0.5, None, "l1", False, False, [], 1, 0, None, False), 8, kept_notes=notes)
    slice_ = "a slice of part of its channels follows"
    assert notes == {"blocks.2.body.2": "Torch-Pruning's dependency search does not end", "blocks.1.body.2": slice_,
                     "blocks.0.body.2": slice_, "stem": slice_, "mid": "pruning it breaks the model (RuntimeError)"}
    assert "5 layer(s) keep their channels" in caplog.text
    assert model.blocks[0].body[0].out_channels == 16 and model.mid.out_channels == 32  # inside pruned, kept kept
    assert model(x).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["channel", "magnitude"])
def test_prune_shrinks_and_reloads(cfg_factory, tmp_path, method):
    cfg = cfg_factory("stage=prune", f"prune.method={method}", "prune.ratio=0.5", "prune.steps=2",
                      "prune.step_epochs=0", "prune.epochs=0", "model=resnet20", "model.width=0.5",
                      "data.train_subset=256")
    art = run_pipeline(cfg, tmp_path / "run")["prune"]
    m = art.metrics
    model, _ = art.model()  # rebuilt from the checkpoint with weights_only=True
    if method == "channel":
        assert m["macs"] < 0.5 * m["baseline"]["macs"] and model.conv1.out_channels == 8 and not m["kept_unprunable"]
        assert model.layer1[0].conv1.out_channels < 8
    else:
        assert m["macs"] == m["baseline"]["macs"] and 0.45 < m["weight_sparsity"] < 0.55
        assert "weight_orig" not in str(list(model.state_dict()))


@pytest.mark.parametrize("name,float_layers", [("resnet8", ()), ("mobilenet_v2", ()), ("resnet8", ("conv1", "layer1"))])
def test_deploy_form_computes_exactly_what_qat_trained(name, float_layers):
    """to_deploy (INT8 weight buffers, INT32 bias, constant activation qparams) equals the QAT model."""
    torch.manual_seed(0)
    model = build_model({"name": name, "num_classes": 10, "width": 0.5}).eval()
    x = torch.randn(8, 3, 32, 32)
    gm = quant.prepare_qat(model, quant.QuantSpec("uint8", 7, 0.01, float_layers))
    quant.calibrate(gm, [(x, None)])
    gm.eval()
    dep = quant.to_deploy(gm)
    assert {n for n, m in dep.named_modules() if isinstance(m, quant.DeployConv)} == set(quant.quantized_layers(gm))
    for m in dep.modules():
        if isinstance(m, quant.DeployConv):
            assert m.w_q.dtype == torch.int8 and m.w_q.abs().max() <= 63  # 7-bit weights
    with torch.no_grad():
        torch.testing.assert_close(dep(x), gm(x), rtol=1e-5, atol=1e-5)


def test_inference_reuses_quantized_weights_until_what_they_come_from_changes():
    torch.manual_seed(0)
    model = build_model({"name": "resnet8", "num_classes": 10, "width": 0.5}).eval()
    gm = quant.prepare_qat(model, quant.QuantSpec("uint8", ORT_BITS, 0.01, ()))
    quant.calibrate(gm, [(torch.randn(4, 3, 32, 32), None)])
    gm.eval()
    m = next(m for m in gm.modules() if isinstance(m, quant.QConvBn) and m.bn is not None and m.in_quant is not None)

    def fresh():
        w, b = m.folded()
        return quant.fake_quant_weight(w, m.bits), quant.quantize_bias(b, w, m.bits, m.in_quant)[0]

    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    changes = [lambda: m.conv.weight.mul_(1.5), lambda: m.bn.bias.add_(0.3), lambda: m.bn.running_var.mul_(2),
               lambda: m.in_quant.scale.mul_(2), lambda: [p.grad.fill_(1.0) for p in m.parameters()] and opt.step()]
    with torch.no_grad():
        first = m.quantized()
        assert m.quantized()[0] is first[0]  # nothing changed: reused
    for change in changes:
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        with torch.no_grad():
            change()
            got, want = m.quantized(), fresh()
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert m.quantized()[0].requires_grad  # autograd on: computed each call, differentiable


@pytest.mark.parametrize("dtype,lo,hi,scale,zp", [
    ("uint8", -1.0, 3.0, 4.0 / 255, 64),   # asymmetric: [min, max] onto 0..255, zero exactly representable
    ("uint8", 0.5, 2.0, 2.0 / 255, 0),     # a range without 0 is widened to include it
    ("int8", -1.0, 3.0, 3.0 / 127, 0),     # symmetric: max |x| onto 127
])
def test_activation_qparams(dtype, lo, hi, scale, zp):
    aq = quant.ActQuant(quant.QuantSpec(dtype, ORT_BITS, 0.01, ()))
    aq.calibrating = True
    aq(torch.tensor([lo, hi, (lo + hi) / 2]))
    assert aq.scale.item() == pytest.approx(scale, rel=1e-6) and aq.zero_point.item() == zp
    aq.calibrating, aq.enabled = False, True
    y = aq.eval()(torch.tensor([0.0, hi, hi + 10]))
    assert y[0].item() == 0.0 and y[1].item() == pytest.approx(hi, abs=scale / 2)
    assert y[2].item() == pytest.approx(hi, abs=scale)  # clipped at the top of the range


def test_observer_moves_by_ema_during_qat():
    aq = quant.ActQuant(quant.QuantSpec("uint8", ORT_BITS, 0.25, ()))
    aq.calibrating = True
    aq(torch.tensor([0.0, 4.0]))
    aq.calibrating = False
    aq.train()(torch.tensor([0.0, 8.0]))
    assert aq.max_val.item() == pytest.approx(4.0 + 0.25 * (8.0 - 4.0))


def test_auto_weight_bits_and_float_layers_follow_the_cpu(monkeypatch):

    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2", "fma"]})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert quant.resolve_weight_bits("auto")[0] == 7 and "no VNNI" in quant.resolve_weight_bits("auto")[1]
    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2", "avx512_vnni"]})
    assert quant.resolve_weight_bits("auto") == (8, "auto: this CPU has avx512_vnni")
    assert quant.resolve_weight_bits(7)[0] == 7
    model = build_model(R8)  # width 0.5: 8/16/32 channels
    assert quant.narrow_convs(model) == []  # with VNNI narrow INT8 convs are not slower
    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2", "fma"]})
    narrow = quant.narrow_convs(model)
    # the stem itself; a narrow conv inside a block widens to the block (a lone float conv between
    # DequantizeLinear and QuantizeLinear would be quantized by ONNX Runtime itself)
    assert narrow == ["conv1", "layer1.0"], narrow
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert quant.narrow_convs(model) == [] and quant.resolve_weight_bits("auto")[0] == 8


@pytest.mark.heavy  # every default-run QAT resolves qat.weight_bits=auto; test_placement covers float_layers=auto
def test_qat_with_auto_settings_runs_and_records_why(cfg_factory, tmp_path, monkeypatch):

    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2", "fma"]})  # no VNNI
    done = run_pipeline(cfg_factory("stage=export", "qat.source=train", "qat.weight_bits=auto",
                                    "qat.float_layers=[auto]"), tmp_path / "run")
    m = done["qat"].metrics
    assert m["quant"]["weight_bits"] == 7 and m["weight_bits_reason"].startswith("auto: no VNNI")
    assert m["quant"]["float_layers"] == ["conv1", "layer1.0"]  # resnet8 at width 0.5: 8-channel stem and block
    cov = done["export/qat"].metrics["int8_coverage"]  # the float blocks stay float in ONNX Runtime too
    assert cov["int8_kernels"] == cov["quantized_layers"] and cov["float_kernels"] > 0
    assert done["export/qat"].metrics["parity"]["top1_agreement"] >= 99.0


@pytest.mark.slow
def test_qat_re_estimates_batch_norm_statistics_before_calibration_when_asked(cfg_factory, tmp_path):
    """qat.bn_adapt_batches: the float model's running statistics are re-estimated (and its accuracy recorded)
    before calibration; at 0 the artifact key is the one built before the setting existed; with qat.init=ptq it
    is a one-line error."""
    qat = ("stage=qat", "qat.source=train", "qat.epochs=0")
    assert Runner(cfg_factory(*qat), tmp_path).key("qat") == Runner(cfg_factory(
        *qat, "qat.bn_adapt_batches=0"), tmp_path).key("qat") != Runner(cfg_factory(
            *qat, "qat.bn_adapt_batches=2"), tmp_path).key("qat")
    with pytest.raises(PipelineError, match=r"qat.bn_adapt_batches=2 adapts the float model before calibration; "
                                            r"with qat.init=ptq .* set qat.bn_adapt_batches=0"):
        Runner(cfg_factory(*qat, "qat.bn_adapt_batches=2", "qat.init=ptq"), tmp_path)

    done = run_pipeline(cfg_factory(*qat, "qat.bn_adapt_batches=2"), tmp_path / "run")
    assert 0 <= done["qat"].metrics["test_acc_bn_adapted"] <= 100
    trained, adapted = _running_means(tmp_path, "train"), _running_means(tmp_path, "qat")
    assert len(adapted) == len(trained) > 0 and not adapted & trained  # every statistic re-estimated


def _running_means(tmp_path: Path, stage: str) -> set:
    path = next((tmp_path / "outputs" / "artifacts" / stage).glob("*/model.pt"))
    sd = torch.load(path, weights_only=True)["state_dict"]
    return {tuple(v.tolist()) for k, v in sd.items() if k.endswith("running_mean")}


@pytest.mark.slow
def test_prune_re_estimates_batch_norm_statistics_before_fine_tuning_when_asked(cfg_factory, tmp_path):
    """prune.bn_adapt_batches with prune.epochs=0: the pruned model keeps the re-estimated statistics, the
    accuracy after adaptation is recorded; at 0 the artifact key is the one built before the setting existed."""
    prune = ("stage=prune", "prune.epochs=0", "prune.ratio=0.5")
    assert Runner(cfg_factory(*prune), tmp_path).key("prune") == Runner(cfg_factory(
        *prune, "prune.bn_adapt_batches=0"), tmp_path).key("prune")
    done = run_pipeline(cfg_factory(*prune, "prune.bn_adapt_batches=2"), tmp_path / "run")
    m = done["prune"].metrics
    assert m["test_acc"] == m["test_acc_bn_adapted"] and 0 <= m["test_acc_before_finetune"] <= 100
    trained, adapted = _running_means(tmp_path, "train"), _running_means(tmp_path, "prune")
    assert adapted and not adapted & trained


def test_qat_that_ends_far_below_its_calibrated_start_is_called_diverged():
    from stages.qat import divergence_note

    assert divergence_note(84.0, 85.0) is None and divergence_note(80.5, 85.0) is None
    note = divergence_note(10.0, 85.21)
    assert note.startswith("training ended 75.2 points below") and "qat.lr" in note and "qat.select=best" in note


class _TinyViTBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 32, 8, stride=8)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        a, _ = self.attn(t, t, t, need_weights=False)
        return self.head((t + a).mean(1))


def test_in_place_activations_export_out_of_place_and_are_restored(tmp_path, caplog):
    """In-place ReLU/Hardswish export as their functional forms (the exporter's in-place route costs seconds per
    model); the model computes the same at another batch size and keeps its in-place modules afterwards. The
    exporter's graph passes log nothing below WARNING, even with the root logger at INFO (a search's probe)."""
    import logging

    import numpy as np
    import onnxruntime as ort

    passes = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript")]
    for lg in passes:  # as outside the pipeline's own runs (the tests' fixture quiets them)
        lg.setLevel(logging.NOTSET)
    caplog.set_level(logging.INFO)

    traced = []

    class Spy(torch.nn.ReLU):
        def forward(self, x):
            traced.append(self.inplace)
            return super().forward(x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), Spy(inplace=True), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Hardswish(inplace=True), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 10))
    onnxio.export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "f.onnx", 18)
    assert traced and not any(traced)
    assert [m.inplace for m in model if hasattr(m, "inplace")] == [True, True]
    assert not [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("onnx_ir", "onnxscript")]
    assert [lg.level for lg in passes] == [logging.NOTSET] * 2
    assert {"Relu", "HardSwish"} <= set(onnxio.op_counts(tmp_path / "f.onnx"))
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(tmp_path / "f.onnx").run(None, {"input": x})[0]
    assert np.abs(got - model(torch.from_numpy(x)).detach().numpy()).max() < 1e-5


def test_export_translates_the_captured_graph_when_it_needs_no_decomposition(tmp_path, monkeypatch):
    """Eval batch norm, in-place adds and a global adaptive pool (ResNet-8) and a QAT deploy graph export without
    the decomposition pass, into the graph that pass gives (same ops, same outputs); an in-place op on a view
    keeps the pass, and the model still computes what PyTorch does."""
    import numpy as np
    import onnxruntime as ort

    taken = []
    check = onnxio._translatable_as_captured
    monkeypatch.setattr(onnxio, "_translatable_as_captured", lambda *a: taken.append(check(*a)) or taken[-1])
    torch.manual_seed(0)
    model = build_model(R8).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
    gm = quant.prepare_qat(model, SPEC)
    x = torch.randn(8, 3, 32, 32)
    quant.calibrate(gm, [(x, None)])
    cases = {"fp32": (model, {}), "int8": (quant.to_deploy(gm.eval()), quant.onnx_translations())}
    for name, (m, table) in cases.items():
        onnxio.export_onnx(m, x[:2], tmp_path / f"{name}.onnx", 18, table)
        onnxio.export_onnx(m, x[:2], tmp_path / f"{name}_decomposed.onnx", 18, table, single_trace=False)
        fast, ref = (str(tmp_path / f"{name}{s}.onnx") for s in ("", "_decomposed"))
        assert onnxio.op_counts(fast) == onnxio.op_counts(ref)
        outs = [ort.InferenceSession(f).run(None, {"input": x.numpy()})[0] for f in (fast, ref)]
        np.testing.assert_array_equal(*outs)
    assert taken == [True, True]

    class MutateView(torch.nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            y[:, :1].mul_(2.0)  # through a view: y changes, which a plain mul of the view would not do
            return y + 1

    onnxio.export_onnx(MutateView(), x[:2], tmp_path / "view.onnx", 18)
    assert taken[-1] is False
    got = ort.InferenceSession(tmp_path / "view.onnx").run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, MutateView()(x).numpy(), rtol=1e-6)


def test_bench_export_times_both_exports_and_checks_they_agree(monkeypatch, capsys):
    from pipeline.tools import bench_export

    monkeypatch.setattr("sys.argv", ["bench_export", "--models", "resnet8", "--rounds", "1"])
    bench_export.main()
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:2] == ["resnet8", "fp32"] and row[4].endswith("x") and row[5] == "yes", row
    assert float(row[6]) == 0.0 and float(row[2]) > 0 and float(row[3]) > 0


def test_ort_static_quantization_of_layer_norms_is_quiet(tmp_path, caplog):
    """ORT's quantizer warns once per LayerNorm weight that it cannot quantize per channel (25 lines for a
    ViT) and quantizes it per tensor: those lines are dropped, the model is still quantized."""
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(2), torch.nn.LayerNorm(36),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 36, 10)).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    onnxio.export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "f.onnx", 18)
    with caplog.at_level("WARNING"):
        ort_quantize.static_quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", x, "uint8", 8, tmp_path)
    assert "out-of-range" not in caplog.text
    assert onnxio.op_counts(tmp_path / "q.onnx")["QuantizeLinear"] > 0


def test_ort_static_quantizes_group_norms_that_share_their_constants(tmp_path):
    """GroupNorm exports as InstanceNormalization with a scale of ones, one initializer shared by all of them,
    which ORT's quantize_static refused on timm's BiT ("shared mode is not supported for weight"): each node
    gets its own copy, the model computes the same."""
    import shutil

    import numpy as np

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.GroupNorm(4, 8), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 10)).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    onnxio.export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "f.onnx", 18)

    def shared(path) -> set[str]:
        import collections

        import onnx

        m = onnx.load(str(path))
        floats = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        return {k for k, v in collections.Counter(i for n in m.graph.node for i in n.input if i in floats).items()
                if v > 1}

    assert shared(tmp_path / "f.onnx")  # the scale of ones, and GroupNorm's affine weights while equal
    shutil.copy(tmp_path / "f.onnx", tmp_path / "u.onnx")
    ort_quantize._unshare_float_initializers(tmp_path / "u.onnx")
    assert not shared(tmp_path / "u.onnx")
    np.testing.assert_array_equal(inference.predict(inference.get().session(tmp_path / "u.onnx", 1), x),
                                  inference.predict(inference.get().session(tmp_path / "f.onnx", 1), x))
    ort_quantize.static_quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", x, "uint8", 8, tmp_path)
    cov = inference.get().kernel_coverage(tmp_path / "q.onnx")
    assert cov["int8_ops"] == {"QLinearConv": 2, "QGemm": 1}
    assert cov["dequantized_ops"].get("InstanceNormalization") == 2, cov  # the GroupNorms run float


def test_duplicate_node_names_are_made_unique(tmp_path):
    """torch 2.11's exporter named two nodes of a QAT MobileNetV2 alike; ONNX Runtime refuses such a model
    ("two nodes with same node name") though onnx.checker passes it. The export renames the second."""
    import numpy as np
    import onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    onnxio.export_onnx(model, torch.from_numpy(x), tmp_path / "f.onnx", 18)
    proto = onnx.load(str(tmp_path / "f.onnx"))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    convs[1].name = convs[0].name  # what the exporter wrote
    onnx.save(proto, str(tmp_path / "dup.onnx"))
    with pytest.raises(PipelineError, match="same node name"):
        inference.get().session(tmp_path / "dup.onnx", 1)
    assert onnxio._unique_node_names(proto.graph) == 1
    assert len({n.name for n in proto.graph.node}) == len(proto.graph.node)
    onnx.save(proto, str(tmp_path / "fixed.onnx"))
    np.testing.assert_array_equal(inference.predict(inference.get().session(tmp_path / "fixed.onnx", 1), x),
                                  inference.predict(inference.get().session(tmp_path / "f.onnx", 1), x))


def test_ort_static_survives_a_failing_symbolic_shape_inference(tmp_path, monkeypatch, caplog):
    """ORT 1.30's symbolic shape inference raises on ViT and Swin exports: pre-processing is redone without it
    (one warning) and the model is still quantized, with what ORT leaves in the working directory then in the
    work directory; a failing quantize_static is one line naming the way out."""
    import numpy as np
    import onnxruntime.quantization as oq

    real = oq.quant_pre_process

    def flaky(src, dst, skip_symbolic_shape=False, **kw):
        if not skip_symbolic_shape:
            Path("sym_shape_infer_temp.onnx").write_bytes(b"")  # as ORT saves the model it got to
            raise IndexError("list index out of range")
        return real(src, dst, skip_symbolic_shape=True, **kw)

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    monkeypatch.setattr(oq, "quant_pre_process", flaky)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 36, 10)).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    onnxio.export_onnx(model, torch.from_numpy(x[:2]), tmp_path / "f.onnx", 18)
    with caplog.at_level("WARNING"):
        ort_quantize.static_quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", x, "uint8", 8, tmp_path)
    assert "symbolic shape inference failed on f.onnx (IndexError: list index out of range)" in caplog.text
    assert onnxio.op_counts(tmp_path / "q.onnx")["QuantizeLinear"] > 0
    assert (tmp_path / "sym_shape_infer_temp.onnx").exists() and not list((tmp_path / "cwd").iterdir())

    def broken(*a, **kw):
        raise ValueError("unsupported op\nmore detail")

    monkeypatch.setattr(oq, "quantize_static", broken)
    with pytest.raises(PipelineError, match=r"quantize_static failed on this model \(ValueError: unsupported op\); "
                                            r"set export.ort_static_reference=false"):
        ort_quantize.static_quantize(tmp_path / "f.onnx", tmp_path / "q2.onnx", x, "uint8", 8, tmp_path)


def test_self_attention_is_unrolled_onto_int8_matmuls(tmp_path):
    """nn.MultiheadAttention (ViT) is unrolled: same outputs, q/k/v/out projections and both attention matmuls
    on INT8 kernels (the scores float into the softmax, whose output is quantized); the caller's float model keeps
    its module."""
    import numpy as np

    torch.manual_seed(0)
    model = _TinyViTBlock().eval()
    x = torch.randn(8, 3, 32, 32)
    t = model.embed(x).flatten(2).transpose(1, 2)
    with torch.no_grad():
        ref = model.attn(t, t, t, need_weights=False)[0]
        assert torch.allclose(quant.SelfAttention(model.attn)(t)[0], ref, atol=1e-5)
    gm = quant.prepare_qat(model, SPEC)
    assert isinstance(model.attn, torch.nn.MultiheadAttention)  # not modified in place
    assert quant.float_ops(gm) == {}
    assert len(quant.quantized_layers(gm)) == 1 + 4 + 1  # embed, q/k/v/out, head
    dep, ops = _calibrated_export(gm, x, tmp_path)
    assert ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] >= 1 and ops["Softmax"] == 1, ops
    assert "QLinearSoftmax" not in ops, ops
    cov = inference.get().kernel_coverage(tmp_path / "q.onnx")
    assert cov["int8_kernels"] == 1 + 4 + 2 + 1 and cov["float_kernels"] == 0, cov
    assert quant.activation_matmuls(dep) == 2  # INT8 kernels that are no layers: no "ORT quantized more" note
    assert requantized_note({**cov, "quantized_layers": 6, "activation_matmuls": 2}) is None
    assert "quantized 1 layer(s)" in requantized_note({**cov, "quantized_layers": 5, "activation_matmuls": 2})
    with torch.no_grad():
        want = dep(x).numpy()
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("module", [False, True])
def test_attention_scores_come_out_float_and_split_qkv_keeps_its_scale(tmp_path, module):
    """EfficientViT's pattern: q, k, v cut from one quantized tensor (chunk) keep its scale, ``q @ k^T`` runs on an
    INT8 kernel with float scores into a float Softmax (ORT's QLinearSoftmax is slower), ``attn @ v`` is
    QLinearMatMul; the result computes what the float model does. An ``nn.Softmax`` module (DaViT) is the same
    (it was listed as a float op, its output on an observed scale)."""

    class Att(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 24, 4, stride=4)
            self.softmax = torch.nn.Softmax(dim=-1) if module else lambda t: t.softmax(-1)

        def forward(self, x):
            q, k, v = self.conv(x).flatten(2).transpose(1, 2).chunk(3, dim=-1)
            return (self.softmax(q @ k.transpose(-1, -2)) @ v).mean(1)

    torch.manual_seed(0)
    model = Att().eval()
    gm = quant.prepare_qat(model, SPEC, 16)
    assert quant.float_ops(gm) == {}
    x = torch.randn(8, 3, 16, 16)
    dep, ops = _calibrated_export(gm, x, tmp_path)
    assert ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1 and ops["Softmax"] == 1, ops
    assert "QLinearSoftmax" not in ops and quant.activation_matmuls(dep) == 2, ops
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=0.1, atol=0.05)


class _WithFlag(torch.nn.Module):
    """A forward with an optional flag it branches on (timm's attn_mask=None, is_causal=False are the same)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16, 10)

    def forward(self, x, return_features: bool = False, mask=None):
        f = torch.relu(self.conv(x)).mean((2, 3))
        if return_features:
            return f
        return self.head(f if mask is None else f * mask)


def test_optional_forward_arguments_are_traced_at_their_defaults():
    gm = quant.prepare_qat(_WithFlag().eval(), SPEC)  # a Python branch on an input would not trace
    with torch.no_grad():
        assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # the head ran: the flag was False, the mask None


class _SplitBlock(torch.nn.Module):
    """ShuffleNetV2's channel split: half the channels pass, half go through a conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Conv2d(32, 16, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        return self.head(torch.cat([a, torch.relu(self.branch(b))], dim=1)).mean((2, 3))


def test_slices_of_quantized_tensors_keep_their_scale_and_run_int8(tmp_path):
    """A getitem of a quantized tensor re-uses its source's scale, so ORT runs the Split on INT8 data:
    nothing stays float and no DequantizeLinear is left before the Split (own scales left it float)."""
    import numpy as np
    import onnx

    torch.manual_seed(0)
    model = _SplitBlock().eval()
    gm = quant.prepare_qat(model, SPEC)
    assert quant.float_ops(gm) == {}
    shared = [m for m in gm.modules() if isinstance(m, quant.SharedQuant)]
    assert len(shared) == 2 and shared[0].source is shared[1].source
    x = torch.randn(8, 3, 16, 16)
    dep, ops = _calibrated_export(gm, x, tmp_path, opt_level="extended")
    assert ops["Split"] == 1 and ops["QLinearConv"] == 3 and ops["QLinearConcat"] == 1, ops
    graph = onnx.load(str(tmp_path / "o.onnx")).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    split = next(n for n in graph.node if n.op_type == "Split")
    assert made_by[split.input[0]] == "QLinearConv"  # INT8 in, INT8 out
    with torch.no_grad():
        want = dep(x).numpy()
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_hardswish_rewrite_matches_ort_for_both_activation_types(tmp_path, act_dtype):
    """The QLinearAdd constant and the [0, 6] requantization use the activation type's own codes."""
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.Hardswish(),
                                torch.nn.Conv2d(16, 16, 1), torch.nn.Hardsigmoid()).eval()
    gm = quant.prepare_qat(model, quant.QuantSpec(act_dtype, ORT_BITS, 0.01, ()))
    assert quant.float_ops(gm) == {}
    x = torch.randn(4, 3, 32, 32) * 2
    quant.calibrate(gm, [(x, None)])
    dep = quant.to_deploy(gm.eval())
    with torch.no_grad():
        want, ref = dep(x).numpy(), model(x).numpy()
    assert np.abs(want - ref).max() < 0.05  # still Hardsigmoid(conv(Hardswish(...))), within quantization error
    onnxio.export_onnx(dep, x[:2], tmp_path / "q.onnx", 18, quant.onnx_translations())
    got = inference.predict(inference.get().session(tmp_path / "q.onnx", 1), x.numpy())
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6  # at most one output step (of 1/255) apart


def test_only_spatial_means_export_as_global_average_pool(tmp_path):
    """Means over H, W become GlobalAveragePool (QLinearGlobalAveragePool in INT8); a mean over channels stayed
    one too and the export failed (ConvNeXt-V2's response norm): it is a ReduceMean."""
    import onnx

    class Means(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.pool(y).flatten(1) + y.mean(1, keepdim=True).mean((2, 3))

    model, x = Means().eval(), torch.randn(2, 3, 8, 8)
    onnxio.export_onnx(model, x, tmp_path / "m.onnx", 18)
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert "ReduceMean" in ops and "GlobalAveragePool" in ops
    got = inference.predict(inference.get().session(tmp_path / "m.onnx"), x.numpy())
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), atol=1e-5, rtol=1e-5)


def test_exports_share_one_torchlib_registry_and_write_the_same_bytes(tmp_path, monkeypatch):
    """The exporter's torchlib registry is built once per process; each export gets its own copy to extend
    with its translations, so an export with the QDQ translations leaves nothing behind for the next one."""
    import contextlib

    from torch.onnx._internal.exporter import _registration

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    onnxio.export_onnx(model, x, tmp_path / "a.onnx", 18, quant.onnx_translations())
    onnxio.export_onnx(model, x, tmp_path / "b.onnx", 18)
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original  # restored after each export
    assert onnxio._TORCHLIB and not any(m.is_custom for reg in onnxio._TORCHLIB.values()
                                        for metas in reg.functions.values() for m in metas)
    monkeypatch.setattr(onnxio, "_torchlib_registry_built_once", contextlib.nullcontext)
    onnxio.export_onnx(model, x, tmp_path / "c.onnx", 18)
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
