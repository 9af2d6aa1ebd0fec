"""The conformance suite: published timm architectures, by family, with their input sizes.

Each entry is built with `timm.create_model(arch, pretrained=False)` (random init, nothing is
downloaded). `small` is the smallest input side the model accepts among 32, 64, 96, ... (up to
its default), found by `benchmarks/conformance.py --probe-sizes`, raised where float32 is
ill-conditioned at the smallest side (efficientnet_b0_gn: at 32 its last GroupNorms normalise
1x1 maps, and ONNX Runtime's run of the *unpruned* model already differs from torch by
4.5e-4 relative; at 64 by 6.6e-5, the slim model by 4e-6); models whose constructor
takes `img_size` (ViTs, Swin, ...) are built at that size (`img_size_kwarg`). `default` is the
side of its pretrained configuration. `deploy` entries are re-parameterisable models
(RepVGG, MobileOne, FastViT, ...) fused into their inference form before zeroing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # timm name
    family: str
    small: int
    default: int
    img_size_kwarg: bool = False
    deploy: bool = False
    channels: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.arch}@deploy" if self.deploy else self.arch

    def size(self, which: str) -> int:
        if which not in ("small", "default"):
            raise ValueError(f"unknown size {which!r} (small or default)")
        return self.small if which == "small" else self.default


# arch, family, smallest accepted side, default side, flags (img: built with img_size at the
# small side; deploy: re-parameterised before zeroing)
_TABLE = """
resnet10t                         resnet          32    176     
resnet14t                         resnet          32    176     
resnet18                          resnet          32    224     
resnet26                          resnet          32    224     
resnet34                          resnet          32    224     
resnet50                          resnet          32    224     
resnet18d                         resnet-d        32    224     
resnet50d                         resnet-d        32    224     
resnext26ts                       resnext         32    256     img
resnext50_32x4d                   resnext         32    224     
res2net50_26w_4s                  res2net         32    224     
res2next50                        res2net         32    224     
skresnet18                        sknet           32    224     
skresnext50_32x4d                 sknet           32    224     
resnest14d                        resnest         32    224     
regnetx_002                       regnet          32    224     
regnety_002                       regnet          32    224     
regnetz_005                       regnet          32    224     
regnetz_b16                       regnet          32    224     img
legacy_seresnet18                 senet           32    224     
seresnext26d_32x4d                senet           32    224     
ecaresnet26t                      eca-resnet      32    256     
ecaresnetlight                    eca-resnet      32    224     
resnetv2_18                       resnetv2        32    224     
resnetv2_50x1_bit                 resnetv2        32    224     
resnetv2_50d_gn                   resnetv2        32    224     
resnetv2_50d_evos                 resnetv2        32    224     
gernet_s                          byobnet         32    224     img
gcresnext26ts                     byobnet         32    256     img
bat_resnext26ts                   byobnet         256   256     
botnet26t_256                     attention-cnn   32    256     img
halonet26t                        attention-cnn   256   256     
lambda_resnet26t                  attention-cnn   32    256     img
haloregnetz_b                     attention-cnn   224   224     
densenet121                       densenet        32    224     
dla34                             dla             32    224     
dla46_c                           dla             32    224     
dla60x_c                          dla             32    224     
dpn48b                            dpn             32    224     
dpn68                             dpn             32    224     
cspresnet50                       csp             32    256     
cspdarknet53                      csp             32    256     
cs3darknet_s                      csp             32    256     
cs3darknet_focus_s                csp             32    256     
darknet17                         csp             32    256     
ese_vovnet19b_slim                vovnet          32    224     
ese_vovnet19b_slim_dw             vovnet          32    224     
ese_vovnet19b_dw                  vovnet          32    224     
hrnet_w18_small                   hrnet           32    224     
mobilenetv1_100                   mobilenetv1     32    224     
mobilenetv1_100h                  mobilenetv1     32    224     
mobilenetv2_035                   mobilenetv2     32    224     
mobilenetv2_100                   mobilenetv2     32    224     
mobilenetv3_small_050             mobilenetv3     32    224     
mobilenetv3_small_100             mobilenetv3     32    224     
mobilenetv3_large_100             mobilenetv3     32    224     
tf_mobilenetv3_small_minimal_100  mobilenetv3     32    224     
tf_mobilenetv3_small_075          mobilenetv3     32    224     
mobilenetv4_conv_small_035        mobilenetv4     32    224     
mobilenetv4_conv_small            mobilenetv4     32    224     
mobilenetv4_conv_medium           mobilenetv4     32    256     
mobilenetv4_hybrid_medium         mobilenetv4     32    256     
lcnet_050                         lcnet           32    224     
lcnet_100                         lcnet           32    224     
efficientnet_b0                   efficientnet    32    224     
efficientnet_es                   efficientnet    32    224     
efficientnet_lite0                efficientnet    32    224     
efficientnet_b0_gn                efficientnet    64    224     
tf_efficientnet_b0                efficientnet-tf 32    224     
tf_efficientnet_lite0             efficientnet-tf 32    224     
tf_efficientnet_es                efficientnet-tf 32    224     
tf_efficientnet_cc_b0_4e          efficientnet-tf 32    224     
efficientnetv2_rw_t               efficientnetv2  32    224     
tf_efficientnetv2_b0              efficientnetv2  32    192     
mixnet_s                          mixnet          32    224     
tf_mixnet_s                       mixnet          32    224     
ghostnet_050                      ghostnet        32    224     
ghostnetv2_100                    ghostnet        64    224     
ghostnetv3_050                    ghostnet        64    224     
rexnet_100                        rexnet          32    224     
rexnetr_100                       rexnet          32    224     
mnasnet_050                       mnasnet         32    224     
mnasnet_small                     mnasnet         32    224     
semnasnet_050                     mnasnet         32    224     
spnasnet_100                      nas-mobile      32    224     
fbnetc_100                        nas-mobile      32    224     
fbnetv3_b                         nas-mobile      32    224     
hardcorenas_a                     nas-mobile      32    224     
tinynet_e                         nas-mobile      32    106     
repvgg_a0                         repvgg          32    224     img
repvgg_a0                         repvgg          32    224     img deploy
repvgg_b0                         repvgg          32    224     img
repvgg_b0                         repvgg          32    224     img deploy
mobileone_s0                      mobileone       32    224     img
mobileone_s0                      mobileone       32    224     img deploy
mobileone_s1                      mobileone       32    224     img
mobileone_s1                      mobileone       32    224     img deploy
repvit_m1                         repvit          32    224     img
repvit_m1                         repvit          32    224     img deploy
repghostnet_050                   repghost        32    224     
repghostnet_050                   repghost        32    224     deploy
hgnet_tiny                        hgnet           32    224     
hgnetv2_b0                        hgnet           32    224     
convnext_atto                     convnext        32    224     
convnext_nano                     convnext        32    224     
convnext_atto_ols                 convnext        32    224     
convnext_zepto_rms                convnext        32    224     
convnextv2_atto                   convnextv2      32    224     
convnextv2_pico                   convnextv2      32    224     
inception_next_atto               inceptionnext   32    224     
poolformer_s12                    poolformer      32    224     
poolformerv2_s12                  poolformer      32    224     
convformer_s18                    metaformer      32    224     
caformer_s18                      metaformer      32    224     
edgenext_xx_small                 edgenext        32    256     
edgenext_x_small                  edgenext        32    256     
mobilevit_xxs                     mobilevit       32    256     img
mobilevitv2_050                   mobilevit       32    256     img
fastvit_t8                        fastvit         32    256     
fastvit_t8                        fastvit         32    256     deploy
fastvit_sa12                      fastvit         32    256     
fastvit_mci0                      fastvit         32    256     
efficientvit_b0                   efficientvit    32    224     
efficientvit_m0                   efficientvit    32    224     img
efficientformer_l1                efficientformer 224   224     
efficientformerv2_s0              efficientformer 32    224     img
tiny_vit_5m_224                   tinyvit         32    224     
vit_tiny_patch16_224              vit             32    224     img
vit_small_patch32_224             vit             32    224     img
vit_tiny_r_s16_p8_224             vit             32    224     img
vit_pwee_patch16_reg1_gap_256     vit             32    256     img
vit_relpos_small_patch16_224      vit             32    224     img
deit_tiny_patch16_224             deit            32    224     img
deit_tiny_distilled_patch16_224   deit            32    224     img
deit3_small_patch16_224           deit            32    224     img
eva02_tiny_patch14_224            eva             32    224     img
cait_xxs24_224                    cait            32    224     img
convit_tiny                       convit          32    224     img
twins_pcpvt_small                 twins           32    224     img
twins_svt_small                   twins           32    224     img
crossvit_tiny_240                 crossvit        240   240     
visformer_tiny                    visformer       32    224     img
tnt_s_patch16_224                 tnt             32    224     img
swin_tiny_patch4_window7_224      swin            32    224     img
swin_s3_tiny_224                  swin            32    224     img
swinv2_tiny_window8_256           swinv2          32    256     img
swinv2_cr_tiny_ns_224             swinv2          32    224     img
pvt_v2_b0                         pvt-v2          32    224     
pvt_v2_b1                         pvt-v2          32    224     
xcit_nano_12_p16_224              xcit            32    224     img
xcit_nano_12_p8_224               xcit            32    224     img
pit_ti_224                        pit             32    224     img
pit_ti_distilled_224              pit             32    224     img
levit_128s                        levit           32    224     img
levit_conv_128s                   levit           32    224     img
coat_lite_tiny                    coat            32    224     img
coat_tiny                         coat            32    224     img
mixer_s32_224                     mlp-mixer       32    224     img
mixer_s16_224                     mlp-mixer       32    224     img
gmlp_ti16_224                     gmlp            32    224     img
resmlp_12_224                     resmlp          32    224     img
nf_resnet26                       nfnet           32    224     
nf_regnet_b0                      nfnet           32    192     
nfnet_l0                          nfnet           32    224     
eca_nfnet_l0                      nfnet           32    224     
maxvit_pico_rw_256                maxvit          32    256     img
maxvit_rmlp_pico_rw_256           maxvit          32    256     img
coatnet_pico_rw_224               coatnet         32    224     img
davit_tiny                        davit           32    224     
focalnet_tiny_srf                 focalnet        32    224     
gcvit_xxtiny                      gcvit           32    224     img
nest_tiny                         nest            32    224     img
mvitv2_tiny                       mvitv2          32    224     img
sequencer2d_s                     sequencer       32    224     img
volo_d1_224                       volo            32    224     img
nextvit_small                     nextvit         32    224     
hiera_tiny_224                    hiera           32    224     img
starnet_s050                      starnet         32    224     
shvit_s1                          shvit           32    224     
mambaout_femto                    mambaout        32    224     
fasternet_t0                      fasternet       32    224     
swiftformer_xs                    swiftformer     32    224     img
rdnet_tiny                        rdnet           32    224     
inception_v3                      inception       96    299     
legacy_xception                   xception        32    299     
selecsls42b                       selecsls        32    224     
tresnet_m                         tresnet         32    224     
"""


def _parse(table: str) -> list[ModelSpec]:
    specs = []
    for line in table.strip().splitlines():
        arch, family, small, default, *flags = line.split()
        specs.append(ModelSpec(arch, family, int(small), int(default), img_size_kwarg="img" in flags,
                               deploy="deploy" in flags))
    return specs


SUITE: list[ModelSpec] = _parse(_TABLE)
BY_NAME: dict[str, ModelSpec] = {s.name: s for s in SUITE}


def get(name: str) -> ModelSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in the conformance suite") from None
