"""The fast conformance subset (CI): one small published architecture per family, both forms.

Each case is what `benchmarks/conformance.py` runs for the whole suite, at the smallest input
side the model accepts: trained-looking weights, 30-50% of every conv's and hidden Linear's
filters zeroed at random (without knowing rwdeploy's channel groups), saved as `.pt2` and as a
pickled module, compiled by `rwdeploy.compile.compile_model`; then ONNX Runtime runs the
shipped `slim.onnx` and is compared with the zeroed torch model (max|diff| <= 1e-4 * max|y|),
and the slim file must not hold more weight bytes than the original.

A model that fails today carries `xfail(strict=True)` with the precise failure: whoever fixes
it sees the test pass unexpectedly and must remove the mark.
"""
from __future__ import annotations

import pytest

import conformance_check
from conformance_models import get

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name -> None (passes in both forms) or {form: precise failure} (strict xfail in that form).
SUBSET: dict[str, dict[str, str] | None] = {
    "resnet10t": None,
    "regnetx_002": None,
    "dla46_c": None,
    "cs3darknet_s": None,
    "ese_vovnet19b_slim_dw": None,
    "mobilenetv1_100": None,
    "mobilenetv2_035": None,
    "mobilenetv3_small_050": None,
    "mobilenetv4_conv_small_035": None,
    "lcnet_050": None,
    "tf_efficientnet_lite0": None,
    "mobileone_s0@deploy": None,
    "convnext_atto": None,
    "convnextv2_atto": None,
    "inception_next_atto": None,
    "poolformerv2_s12": None,
    "edgenext_xx_small": None,
    "mobilevit_xxs": None,
    "fastvit_t8": None,
    "vit_tiny_patch16_224": None,
    "pit_ti_224": None,
    "levit_128s": None,
    "convit_tiny": None,  # in-place writes into views of a torch.export graph (issue 10)
    "mixer_s32_224": None,
    "gmlp_ti16_224": None,
    "resmlp_12_224": None,
    "nf_regnet_b0": None,
}
FORMS = ("pt2", "pickle")


def _cases() -> list:
    cases = []
    for name, failures in SUBSET.items():
        for form in FORMS:
            reason = (failures or {}).get(form)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, form, marks=marks, id=f"{name}-{form}"))
    return cases


def test_subset_spans_families():
    families = {get(name).family for name in SUBSET}
    assert len(SUBSET) >= 25 and len(families) == len(SUBSET)


@pytest.mark.parametrize("name,form", _cases())
def test_compiles_exactly(name, form, tmp_path):
    record = conformance_check.run_case(get(name), "small", form, workdir=tmp_path, account=False)
    assert record["compiled"], f"{record.get('failed_stage')}: {record.get('error')}"
    slim = record["ort"]["slim"]
    assert slim["max_rel"] <= conformance_check.TOLERANCE, (
        f"slim.onnx vs zeroed torch: max rel {slim['max_rel']:.3g} (original.onnx: "
        f"{record['ort']['original']['max_rel']:.3g})")
    weights = record["onnx_weights"]
    assert weights["slim"]["bytes"] <= weights["original"]["bytes"], weights
