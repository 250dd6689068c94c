"""The target contract: capabilities, schedule rules with one signature, per-target pipelines."""

import pytest

from sparsecc.codegen.linear import linear_template
from sparsecc.codegen.nm import nm_linear
from sparsecc.errors import KernelBuildError, TargetError
from sparsecc.passes import ChooseConvFormat, ChooseFormat, LowerSparseConvs, default_pipeline
from sparsecc.targets import Target, apply_rules, resolve_target
from sparsecc.targets import cuda, x86, x86_conv, x86_nm
from sparsecc.targets.arm import ArmTarget
from sparsecc.targets.cuda import CudaTarget
from sparsecc.targets.x86 import X86Target


def test_each_target_implements_the_contract_and_none_derives_from_another():
    targets = [resolve_target("x86"), resolve_target("arm:neoverse-n1"), resolve_target("cuda", build_only=True)]
    assert [type(t) for t in targets] == [X86Target, ArmTarget, CudaTarget]
    for t in targets:
        assert isinstance(t, Target) and t.kind and t.describe() and t.cache_key()
        assert t.supports("linear", "dense") and t.supports("linear", "bsr")
    for a in (X86Target, ArmTarget, CudaTarget):
        for b in (X86Target, ArmTarget, CudaTarget):
            assert a is b or not issubclass(a, b)
    x, arm, gpu = targets
    assert x.can_time_kernels and not arm.can_time_kernels and not gpu.can_time_kernels
    assert x.supports("conv2d", "bsr") and arm.supports("conv2d", "csr") and not gpu.supports("conv2d", "bsr")
    assert x.roofline() is None and arm.roofline() and gpu.roofline()
    assert arm.deploy_arch == "aarch64" and str(arm.deploy_tvm_target().attrs["mcpu"]) == "neoverse-n1"
    assert gpu.build_only and gpu.torch_device == "cuda:0"
    with pytest.raises(TargetError, match="build_only"):
        resolve_target("x86", build_only=True)


def test_rules_return_none_for_templates_of_other_families():
    lin = linear_template((16, 1), bias=False, activation=None, m_tile=8)
    nm = nm_linear(2, 4, 8, bias=False, activation=None, m_tile=8, r_tile=8, index="column")
    p, q = x86.default_params((16, 1), "gemm"), x86_nm.NMScheduleParams(m_tile=8, r_tile=8)
    assert all(rule(nm, None, p) is None for rule in x86.RULES)
    assert all(rule(lin, None, q) is None for rule in x86_nm.NM_RULES)
    assert all(rule(lin, None, p) is None for rule in x86_conv.CONV_RULES + cuda.RULES)
    assert apply_rules(X86Target().rules, lin, None, p) is not None
    with pytest.raises(KernelBuildError, match="no schedule rule"):
        apply_rules(cuda.RULES, lin, None, p)


def test_pipeline_is_composed_from_capabilities():
    def kinds(target, **kw):
        return [type(p) for p in default_pipeline(target, **kw)]

    x = default_pipeline(X86Target(), sparsity=0.5, measure=True)
    assert [p.measure for p in x if isinstance(p, (ChooseFormat, ChooseConvFormat))] == [True, True]
    assert LowerSparseConvs in kinds(X86Target())
    gpu = CudaTarget("sm_80", build_only=True)
    assert LowerSparseConvs not in kinds(gpu) and ChooseConvFormat in kinds(gpu)
    assert not any(p.measure for p in default_pipeline(gpu) if isinstance(p, (ChooseFormat, ChooseConvFormat)))
