"""DeepLabV3+ models: shapes, heads, ASPP rates, dilation, torchvision-format weights, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embseg import ess
from embseg.errors import EmbsegError
from embseg.models import SegmentationModel, build_model, softmax_cross_entropy

BACKBONES = ["tiny", "mobilenetv2", "resnet50", "resnet101"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_strides_and_output_shapes(backbone, output_stride):
    torch.manual_seed(0)
    model = build_model(backbone=backbone, num_classes=11, embed_dim=8,
                        output_stride=output_stride).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(images)
        emb = model(images)
    assert features["low"].shape[-2:] == (16, 24)
    assert features["high"].shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert features["low"].shape[1] == model.backbone.low_channels
    assert features["high"].shape[1] == model.backbone.high_channels
    assert emb.shape == (1, 8, 64, 96)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1, 64, 96))
    prediction = model.predict(emb)
    assert prediction.shape == (1, 64, 96) and prediction.dtype == torch.long
    assert 0 <= int(prediction.min()) and int(prediction.max()) < 11


def test_odd_input_size_comes_back_at_input_resolution():
    model = build_model(num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 67, 45)).shape == (2, 32, 67, 45)


def test_softmax_head_gives_class_logits_and_no_class_table():
    model = build_model(num_classes=13, head="softmax").eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 48, 40))
    assert logits.shape == (2, 13, 48, 40)
    # pixel-major, so that the loss reads it as (pixels, C) rows without a copy
    assert logits.is_contiguous(memory_format=torch.channels_last)
    assert model.class_embeddings is None
    assert torch.equal(model.predict(logits), logits.argmax(dim=1))
    with pytest.raises(ValueError):
        model.normalized_class_embeddings()


def test_class_table_is_uniform_in_unit_box_and_predict_uses_it_normalised():
    torch.manual_seed(1)
    model = build_model(num_classes=300, embed_dim=16).eval()
    table = model.class_embeddings.detach()
    assert table.shape == (300, 16)
    assert float(table.min()) >= -1.0 and float(table.max()) <= 1.0
    assert float(table.min()) < -0.9 and float(table.max()) > 0.9  # spread, not near zero
    emb = F.normalize(torch.randn(2, 16, 5, 6), dim=1)
    brute = torch.cdist(emb.permute(0, 2, 3, 1).reshape(-1, 16), F.normalize(table, dim=1))
    assert torch.equal(model.predict(emb).reshape(-1), brute.argmin(dim=1))


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("output_stride,rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_branches_and_rates(output_stride, rates):
    model = build_model(backbone="resnet50", num_classes=4, output_stride=output_stride)
    aspp = model.decoder.aspp
    assert len(aspp.convs) == 5
    assert aspp.convs[0][0].kernel_size == (1, 1)
    dilations = tuple(branch[0].dilation[0] for branch in list(aspp.convs)[1:4])
    assert dilations == rates
    assert all(branch[0].kernel_size == (3, 3) for branch in list(aspp.convs)[1:4])
    assert isinstance(aspp.convs[4][0], nn.AdaptiveAvgPool2d)
    assert all(branch[0].out_channels == 256 if not isinstance(branch[0], nn.AdaptiveAvgPool2d)
               else branch[1].out_channels == 256 for branch in aspp.convs)
    assert isinstance(aspp.project[-1], nn.Dropout)
    assert model.decoder.low_level_proj[0].out_channels == 48
    assert model.decoder.fuse[0].in_channels == 256 + 48
    assert model.decoder.fuse[0].kernel_size == (3, 3) and model.decoder.fuse[3].out_channels == 256


def resnet_conv2_dilations(model: SegmentationModel, layer: str) -> list[tuple[int, int]]:
    return [(block.conv2.stride[0], block.conv2.dilation[0])
            for block in getattr(model.backbone, layer)]


def test_resnet_replaces_strides_with_dilation_like_torchvision():
    os16 = build_model(backbone="resnet50", num_classes=3, output_stride=16)
    assert resnet_conv2_dilations(os16, "layer3") == [(2, 1)] + [(1, 1)] * 5
    assert resnet_conv2_dilations(os16, "layer4") == [(1, 1), (1, 2), (1, 2)]
    os8 = build_model(backbone="resnet50", num_classes=3, output_stride=8)
    assert resnet_conv2_dilations(os8, "layer3") == [(1, 1)] + [(1, 2)] * 5
    assert resnet_conv2_dilations(os8, "layer4") == [(1, 2), (1, 4), (1, 4)]


def test_torchvision_parameter_names_and_counts():
    """Spot checks against torchvision's published layouts (fc / classifier excluded)."""
    resnet50 = build_model(backbone="resnet50", num_classes=3).backbone.state_dict()
    assert resnet50["conv1.weight"].shape == (64, 3, 7, 7)
    assert resnet50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert resnet50["layer3.5.bn2.running_var"].shape == (256,)
    assert resnet50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert "layer1.0.bn1.num_batches_tracked" in resnet50
    resnet101 = build_model(backbone="resnet101", num_classes=3).backbone
    assert resnet101.state_dict()["layer3.22.conv2.weight"].shape == (256, 256, 3, 3)
    mobilenet = build_model(backbone="mobilenetv2", num_classes=3).backbone.state_dict()
    assert mobilenet["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert mobilenet["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert mobilenet["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert mobilenet["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)
    assert mobilenet["features.2.conv.3.running_mean"].shape == (24,)
    assert mobilenet["features.18.0.weight"].shape == (1280, 320, 1, 1)
    # torchvision totals minus the classifier: 25,557,032 - 2,049,000; 44,549,160 - 2,049,000;
    # 3,504,872 - 1,281,000
    counts = {name: sum(p.numel() for p in build_model(backbone=name, num_classes=3)
                        .backbone.parameters())
              for name in ("resnet50", "resnet101", "mobilenetv2")}
    assert counts == {"resnet50": 23_508_032, "resnet101": 42_500_160, "mobilenetv2": 2_223_872}


def test_tiny_backbone_is_small():
    backbone = build_model(num_classes=3).backbone
    assert 100_000 < sum(p.numel() for p in backbone.parameters()) < 1_000_000


# --------------------------------------------------------------------------- weights


def randomised_state_dict(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(value.shape, generator=generator) if value.is_floating_point()
                  else value.clone())
            for key, value in module.state_dict().items()}


@pytest.mark.parametrize("backbone,head_keys", [
    ("resnet50", {"fc.weight": (1000, 2048), "fc.bias": (1000,)}),
    ("mobilenetv2", {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}),
])
def test_torchvision_format_state_dict_loads(tmp_path, backbone, head_keys):
    source = build_model(backbone=backbone, num_classes=3).backbone
    weights = randomised_state_dict(source, seed=5)
    weights.update({key: torch.zeros(shape) for key, shape in head_keys.items()})
    path = tmp_path / f"{backbone}.pth"
    torch.save(weights, path)
    model = build_model(backbone=backbone, num_classes=3, backbone_weights=path)
    loaded = model.backbone.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, weights[key]), key
    assert "backbone_weights" not in model.config
    assert build_model(**model.config).config == model.config


def test_weights_without_num_batches_tracked_load(tmp_path):
    source = build_model(num_classes=3).backbone
    weights = {key: value for key, value in randomised_state_dict(source, seed=6).items()
               if not key.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "old.pt")
    model = build_model(num_classes=3, backbone_weights=tmp_path / "old.pt")
    assert torch.equal(model.backbone.stem[0][0].weight, weights["stem.0.0.weight"])


@pytest.mark.parametrize("change,message", [
    (lambda w: w.update({"layer9.0.conv1.weight": torch.zeros(1)}), "layer9.0.conv1.weight"),
    (lambda w: w.pop("layer2.1.conv2.weight"), "layer2.1.conv2.weight"),
    (lambda w: w.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}), "conv1.weight"),
])
def test_mismatched_weights_name_the_file_and_the_key(tmp_path, change, message):
    weights = randomised_state_dict(build_model(backbone="resnet50", num_classes=3).backbone, 7)
    change(weights)
    path = tmp_path / "bad.pth"
    torch.save(weights, path)
    with pytest.raises(EmbsegError) as caught:
        build_model(backbone="resnet50", num_classes=3, backbone_weights=path)
    text = str(caught.value)
    assert str(path) in text and message in text and "\n" not in text


def test_unreadable_or_unsafe_weight_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EmbsegError, match="garbage.pth"):
        build_model(num_classes=3, backbone_weights=garbage)
    with pytest.raises(EmbsegError, match="missing.pth"):
        build_model(num_classes=3, backbone_weights=tmp_path / "missing.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv": nn.Conv2d(1, 1, 1)}, unsafe)  # a pickled module, not plain tensors
    with pytest.raises(EmbsegError, match="unsafe.pth"):
        build_model(num_classes=3, backbone_weights=unsafe)


# --------------------------------------------------------------------------- config, groups


def test_config_rebuilds_the_same_model():
    model = build_model(backbone="tiny", head="embedding", num_classes=21, embed_dim=12,
                        output_stride=8, k=5, temperature=10.0, margin=0.3)
    assert model.config == {"backbone": "tiny", "head": "embedding", "num_classes": 21,
                            "embed_dim": 12, "output_stride": 8, "k": 5, "temperature": 10.0,
                            "margin": 0.3}
    rebuilt = build_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # same architecture, strict
    assert (model.head_type, model.num_classes) == ("embedding", 21)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"head": "sigmoid"}, {"k": 0},
                                 {"backbone": "vgg16"}, {"output_stride": 32},
                                 {"temperature": 0.0}, {"embed_dim": 0}])
def test_invalid_settings_are_named(bad):
    arguments = {"num_classes": 5, **bad}
    with pytest.raises(EmbsegError, match=next(iter(bad))):
        build_model(**arguments)


def test_param_groups_split_backbone_and_head():
    model = build_model(num_classes=7)
    groups = model.param_groups(0.02)
    assert [group["lr"] for group in groups] == pytest.approx([0.002, 0.02])
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone_ids
    assert id(model.class_embeddings) in {id(p) for p in groups[1]["params"]}
    torch.optim.SGD(groups, lr=0.02, momentum=0.9, weight_decay=1e-4)  # accepted as is


# --------------------------------------------------------------------------- loss, training


def test_loss_is_ess_plus_margin_with_the_model_settings():
    torch.manual_seed(2)
    model = build_model(num_classes=9, embed_dim=8, k=3, temperature=12.0, margin=0.4)
    emb = F.normalize(torch.randn(2, 8, 6, 5), dim=1)
    target = torch.randint(-1, 9, (2, 6, 5))
    total, parts = model.loss(emb, target)
    table = F.normalize(model.class_embeddings, dim=1)
    expected_ess = ess.ess_loss(emb, target, table, k=3, temperature=12.0)
    expected_margin = ess.margin_penalty(table, 0.4)
    torch.testing.assert_close(total, expected_ess + expected_margin)
    assert parts["ess"] == pytest.approx(float(expected_ess.detach()))
    assert parts["margin"] == pytest.approx(float(expected_margin.detach()))
    assert parts["loss"] == pytest.approx(float(total.detach()))
    total.backward()
    assert model.class_embeddings.grad is not None


def test_softmax_loss_is_cross_entropy_with_ignore():
    model = build_model(num_classes=6, head="softmax")
    logits = torch.randn(2, 6, 4, 4)
    target = torch.randint(-1, 6, (2, 4, 4))
    total, parts = model.loss(logits, target)
    torch.testing.assert_close(total, F.cross_entropy(logits, target, ignore_index=-1))
    assert parts["loss"] == pytest.approx(float(total.detach()))
    empty, _ = model.loss(logits.requires_grad_(), torch.full((2, 4, 4), -1))
    assert float(empty.detach()) == 0.0
    empty.backward()
    assert (logits.grad == 0).all()


def _reference_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                             ignore_index: int = -1) -> torch.Tensor:
    """Mean over labelled pixels of -log softmax at the target class, written out here."""
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
    labelled = target != ignore_index
    picked = log_probs.gather(1, torch.where(labelled, target, 0)[:, None])[:, 0]
    return -(picked * labelled).sum() / labelled.sum()


@pytest.fixture
def cross_entropy_calls(monkeypatch) -> list[torch.Size]:
    """The logits shape of every ``F.cross_entropy`` call from here on (the real one runs)."""
    calls = []
    plain = F.cross_entropy

    def counted(part, *args, **kwargs):
        calls.append(part.shape)
        return plain(part, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", counted)
    return calls


@pytest.mark.parametrize("max_elements, largest_call", [
    (6 * 7 * 5 * 2, 6 * 7 * 5 * 2),  # two samples per call: B = 5 -> calls of 2, 2, 1
    (6 * 7 * 5, 6 * 7 * 5),  # one sample per call
    (6 * 3 * 5 + 7, 6 * 3 * 5),  # bands of 3 rows of a 7-row sample: 3, 3, 1
    (6 * 5, 6 * 5),  # one row per call
])
@pytest.mark.parametrize("ignore_index", [-1, 255])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_softmax_cross_entropy_in_parts_is_the_one_call_mean(cross_entropy_calls,
                                                              max_elements, largest_call,
                                                              ignore_index, layout):
    torch.manual_seed(4)
    logits = torch.randn(5, 6, 7, 5, dtype=torch.float64).contiguous(memory_format=layout)
    target = torch.randint(0, 6, (5, 7, 5))
    target[torch.rand(target.shape) < 0.2] = ignore_index
    target[1] = ignore_index  # a sample without labels: its parts add nothing
    whole = logits.clone().requires_grad_()
    reference = _reference_cross_entropy(whole, target, ignore_index)  # no F.cross_entropy
    reference.backward()
    parted = logits.clone().requires_grad_()
    total = softmax_cross_entropy(parted, target, ignore_index=ignore_index,
                                  max_elements=max_elements)
    total.backward()
    sizes = [shape.numel() for shape in cross_entropy_calls]
    assert max(sizes) == largest_call and sum(sizes) == logits.numel()
    # channels-last parts are given as (pixels, C) rows, the others in the spatial form
    expected_dims = 2 if layout is torch.channels_last else 4
    assert {len(shape) for shape in cross_entropy_calls} == {expected_dims}
    torch.testing.assert_close(total, reference)
    torch.testing.assert_close(parted.grad, whole.grad)


def test_softmax_cross_entropy_fits_one_call_when_it_can(cross_entropy_calls):
    logits, target = torch.randn(2, 4, 3, 3), torch.randint(-1, 4, (2, 3, 3))
    torch.testing.assert_close(softmax_cross_entropy(logits, target, max_elements=72),
                               _reference_cross_entropy(logits, target))
    assert cross_entropy_calls == [logits.shape]
    with pytest.raises(ValueError, match="one row of logits"):
        softmax_cross_entropy(logits, target, max_elements=11)


def toy_batch(num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four 48x48 images of coloured vertical stripes; each colour is one class."""
    generator = torch.Generator().manual_seed(3)
    palette = torch.rand(num_classes, 3, generator=generator) * 2 - 1
    stripes = torch.randint(0, num_classes, (4, 6), generator=generator)
    target = stripes.repeat_interleave(8, dim=1)[:, None, :].expand(4, 48, 48).contiguous()
    images = palette[target].permute(0, 3, 1, 2).contiguous()
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    target[:, :4, :] = -1  # an unlabelled band
    return images, target


def _sgd_losses(model, optimizer, images, target, *, steps: int) -> list[float]:
    """The training loss of each of ``steps`` SGD steps on one batch."""
    losses = []
    for _ in range(steps):
        total, parts = model.loss(model(images), target)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(parts["loss"])
    return losses


@pytest.mark.parametrize("head", ["embedding", "softmax"])
def test_a_few_sgd_steps_lower_the_loss(head):
    torch.manual_seed(4)
    model = build_model(num_classes=10, head=head)
    images, target = toy_batch(10)
    optimizer = torch.optim.SGD(model.param_groups(0.05), lr=0.05, momentum=0.9)
    losses = _sgd_losses(model, optimizer, images, target, steps=15)
    assert losses[-1] < 0.7 * losses[0], losses


def test_single_image_training_batch_works_and_keeps_pooling_statistics():
    model = build_model(num_classes=4).train()
    pooling_norm = model.decoder.aspp.convs[4][2]
    before = pooling_norm.running_mean.clone()
    output = model(torch.randn(1, 3, 64, 64))
    model.loss(output, torch.randint(0, 4, (1, 64, 64)))[0].backward()
    assert torch.equal(pooling_norm.running_mean, before)
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(pooling_norm.running_mean, before)  # batches of 2+ use BN as usual


# --------------------------------------------------------------------------- head options


def test_embed_bn_head_standardises_the_last_conv_and_gives_unit_embeddings():
    torch.manual_seed(5)
    model = build_model(num_classes=9, embed_dim=6, embed_bn=True).train()
    conv, norm = model.decoder.classifier
    assert conv.bias is None and isinstance(norm, nn.BatchNorm2d) and not norm.affine
    images = torch.randn(2, 3, 48, 40)
    features = model.backbone(images)
    raw = model.decoder(features["low"], features["high"])
    # zero mean and unit variance per channel over the batch: no shared component is left
    torch.testing.assert_close(raw.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw.var(dim=(0, 2, 3), unbiased=False), torch.ones(6),
                               atol=1e-3, rtol=0)
    emb = model(images)
    assert emb.shape == (2, 6, 48, 40)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 48, 40))


def test_embed_bn_is_recorded_and_rebuilds_with_its_weights():
    torch.manual_seed(6)
    model = build_model(num_classes=7, embed_dim=8, embed_bn=True)
    model.train()(torch.randn(2, 3, 32, 32))  # move the running statistics off their init
    assert model.config["embed_bn"] is True
    again = build_model(**model.config)
    again.load_state_dict(model.state_dict())  # strict: the same architecture
    model.eval(), again.eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images))
    # the plain head stays the library default (configs without the key rebuild it), and
    # the softmax head has nothing to standardise
    assert "embed_bn" not in build_model(num_classes=7).config
    assert isinstance(build_model(num_classes=7).decoder.classifier, nn.Conv2d)
    softmax = build_model(num_classes=7, head="softmax", embed_bn=True)
    assert "embed_bn" not in softmax.config
    assert isinstance(softmax.decoder.classifier, nn.Conv2d)


@pytest.mark.parametrize(("backbone_mult", "class_mult"), [(1.0, 10.0), (0.1, 1.0), (0.5, 3.0)])
def test_param_groups_apply_the_backbone_and_class_table_multipliers(backbone_mult, class_mult):
    model = build_model(num_classes=7)
    groups = model.param_groups(0.02, backbone_lr_mult=backbone_mult, class_lr_mult=class_mult)
    by_name = {group["name"]: group for group in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.02 * backbone_mult)
    assert by_name["head"]["lr"] == pytest.approx(0.02)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    table_group = by_name["class_table"] if class_mult != 1.0 else by_name["head"]
    assert id(model.class_embeddings) in {id(p) for p in table_group["params"]}
    if class_mult != 1.0:
        assert table_group["lr"] == pytest.approx(0.02 * class_mult)
        assert [id(p) for p in table_group["params"]] == [id(model.class_embeddings)]
    for group in groups:
        assert group["lr"] == pytest.approx(0.02 * group["lr_factor"])
    softmax = build_model(num_classes=7, head="softmax")
    assert [g["name"] for g in softmax.param_groups(0.02, class_lr_mult=10.0)] == [
        "backbone", "head"]


def test_a_few_sgd_steps_lower_the_loss_with_the_trainer_head_settings():
    torch.manual_seed(4)
    model = build_model(num_classes=10, embed_bn=True)
    images, target = toy_batch(10)
    optimizer = torch.optim.SGD(model.param_groups(0.05, backbone_lr_mult=1.0,
                                                   class_lr_mult=10.0), lr=0.05, momentum=0.9)
    losses = _sgd_losses(model, optimizer, images, target, steps=15)
    assert losses[-1] < 0.7 * losses[0], losses


def test_aspp_dropout_is_a_setting_recorded_when_not_the_default():
    model = build_model(num_classes=5, dropout=0.0)
    assert model.decoder.aspp.project[3].p == 0.0 and model.config["dropout"] == 0.0
    assert build_model(**model.config).decoder.aspp.project[3].p == 0.0
    default = build_model(num_classes=5)
    assert default.decoder.aspp.project[3].p == 0.5 and "dropout" not in default.config
    with pytest.raises(EmbsegError, match="dropout=1.0"):
        build_model(num_classes=5, dropout=1.0)
