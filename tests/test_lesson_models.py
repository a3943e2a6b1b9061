"""The lessons' models and data (issue 12, part A): GMP CourseNet, biased ShapesWorld, tiled scenes,
fully convolutional class score maps. Each checked against an independent computation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import model_state, tiny_net
from lecturekit import attribution as A
from lecturekit import cli, data, models, training


@pytest.fixture(scope="module")
def random_gmp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return models.CourseNet(pooling="max").eval()


# ---- class_score_maps -------------------------------------------------------------------------------

def test_class_score_maps_average_to_the_logits(shapes_batch):
    model = models.course_model(pretrained=False, seed=3)
    x = shapes_batch.images[:4]
    before = model_state(model)
    S = A.class_score_maps(model, x)  # (N, K, 8, 8)
    assert S.shape == (4, 8, 8, 8) and not S.requires_grad
    with torch.no_grad():
        assert torch.allclose(S.mean((2, 3)), model(x), atol=1e-5)
    assert model_state(model) == before


def test_class_score_maps_by_hand_on_tiny_net():
    net = tiny_net()
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        feats = net[4](net[3](net[2](net[1](net[0](x.clone())))))  # (2, 6, 6, 6)
        expected = torch.einsum("kc,nchw->nkhw", net[7].weight, feats) + net[7].bias[None, :, None, None]
    S = A.class_score_maps(net, x, layer="4", fc="7")
    assert torch.allclose(S, expected, atol=1e-6)


def test_class_score_maps_grow_with_the_input_and_check_their_inputs(course):
    big = data.scene(["circle", "star", "heart", "cross"], seed=1).images  # (1, 3, 128, 128)
    assert A.class_score_maps(course, big).shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="x"):
        A.class_score_maps(course, torch.rand(3, 64, 64))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
                        nn.Softmax(1))
    with pytest.raises(ValueError, match="not global pooling"):
        A.class_score_maps(net, torch.rand(1, 3, 8, 8), layer="1", fc="4")
    with pytest.raises(ValueError, match="nn.Linear"):
        A.class_score_maps(net, torch.rand(1, 3, 8, 8), layer="1", fc="0")


# ---- GMP CourseNet ----------------------------------------------------------------------------------

def test_gmp_scores_are_max_pooled_features_and_cam_is_their_weighted_sum(random_gmp, shapes_batch):
    x, y = shapes_batch.images[:3], shapes_batch.labels[:3]
    with torch.no_grad():
        feats = random_gmp.features(random_gmp.normalize(x))  # (N, 128, 8, 8)
        scores = random_gmp(x)
        assert torch.allclose(scores, random_gmp.classifier(feats.amax((2, 3))), atol=1e-6)
        expected = torch.einsum("nc,nchw->nhw", random_gmp.classifier.weight[y], feats)
    assert torch.allclose(A.cam(random_gmp, x, y, upsample=False), expected, atol=1e-5)


def test_coursenet_pooling_option_and_fuse_keeps_it():
    assert isinstance(models.CourseNet(pooling="max").pool, nn.AdaptiveMaxPool2d)
    assert isinstance(models.CourseNet().pool, nn.AdaptiveAvgPool2d)
    with pytest.raises(ValueError, match="pooling"):
        models.CourseNet(pooling="median")
    net = training.trainable_model(seed=1, pooling="max")
    net.train()
    with torch.no_grad():  # give the BatchNorms non-trivial running statistics
        net(torch.rand(8, 3, 32, 32))
    net.eval()
    plain = models.fuse_batchnorm(net)
    assert isinstance(plain.pool, nn.AdaptiveMaxPool2d)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), net(x), atol=1e-4)


@pytest.mark.parametrize("weights, pooling, bias", [("gmp", "max", None), ("biased", "avg", training.BIAS)])
def test_bundled_variants_load_small_and_record_their_recipe(weights, pooling, bias):
    path = models.weights_path(weights)
    assert path.stat().st_size <= 2 * 1024 * 1024
    recipe = torch.load(path, weights_only=True)["recipe"]
    assert recipe["pooling"] == pooling and recipe["bias"] == bias
    model = models.course_model(weights=weights)
    assert not model.training
    assert isinstance(model.pool, nn.AdaptiveMaxPool2d if pooling == "max" else nn.AdaptiveAvgPool2d)


def test_gmp_model_is_accurate():
    test = data.shapes(200, seed=training.TEST_SEED)
    assert training.evaluate(models.course_model(weights="gmp"), test) >= 0.95


def test_missing_variant_weights_name_the_train_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_PATH", tmp_path / "coursenet.pt")
    with pytest.raises(FileNotFoundError, match="--pooling max"):
        models.course_model(weights="gmp")
    with pytest.raises(FileNotFoundError, match="--biased"):
        models.course_model(weights="biased")


# ---- biased ShapesWorld -----------------------------------------------------------------------------

def _on_snow(batch):
    """Independent of the generator: an image is on snow when its background is bright and pale."""
    bg = ~batch.masks[:, None]  # (N, 1, S, S)
    mean = (batch.images * bg).sum((2, 3)) / bg.sum((2, 3))  # (N, 3) mean background colour
    return mean.min(1).values > 0.75


def test_biased_shapes_keeps_the_objects_and_only_changes_backgrounds():
    plain = data.shapes(300, seed=9)
    biased = data.biased_shapes(300, seed=9)
    assert torch.equal(plain.labels, biased.labels) and torch.equal(plain.masks, biased.masks)
    assert torch.equal(plain.boxes, biased.boxes)
    assert torch.equal(data.biased_shapes(300, seed=9, background="plain").images, plain.images)
    assert not _on_snow(plain).any()


def test_biased_shapes_bias_statistic():
    b = data.biased_shapes(1024, seed=3, bias=0.9)
    snow, circle = _on_snow(b), b.labels == 0
    assert abs(snow[circle].float().mean().item() - 0.9) < 0.06
    assert abs(snow[~circle].float().mean().item() - 0.1) < 0.04
    s = data.biased_shapes(256, seed=3, background="swapped")
    assert not _on_snow(s)[s.labels == 0].any() and _on_snow(s)[s.labels != 0].all()
    assert _on_snow(data.biased_shapes(64, seed=3, background="snow")).all()
    other = data.biased_shapes(512, seed=3, bias=1.0, biased_class=3)
    assert torch.equal(_on_snow(other), other.labels == 3)


@pytest.mark.parametrize("kwargs, match", [(dict(background="beach"), "background"), (dict(bias=1.5), "bias"),
                                           (dict(bias=True), "bias"), (dict(biased_class=8), "biased_class"),
                                           (dict(biased_class="circle"), "biased_class")])
def test_biased_shapes_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.biased_shapes(4, **kwargs)


def test_training_draws_biased_batches():
    images, labels = training._train_batch(0, 5, 16, None, bias=0.99)
    expected = data.biased_shapes(16, training.TRAIN_SEED_OFFSET + 5, 0.99)
    assert torch.equal(images, expected.images) and torch.equal(labels, expected.labels)


# ---- scenes -----------------------------------------------------------------------------------------

def test_scene_tiles_match_shapes_and_masks_are_consistent():
    sc = data.scene(["star", 0, "star", "heart", "ring", "cross"], seed=4, grid=(2, 3), size=32)
    assert sc.images.shape == (1, 3, 64, 96) and sc.masks.shape == (6, 64, 96)
    assert sc.labels.tolist() == [3, 0, 3, 7, 5, 4]
    pool = data.shapes(32 * 6 + 64, seed=4, size=32)
    firsts = {k: (pool.labels == k).nonzero()[:, 0].tolist() for k in (0, 3, 4, 5, 7)}
    picks = [firsts[3][0], firsts[0][0], firsts[3][1], firsts[7][0], firsts[5][0], firsts[4][0]]
    for t, i in enumerate(picks):
        r, c = divmod(t, 3)
        tile = (slice(r * 32, r * 32 + 32), slice(c * 32, c * 32 + 32))
        assert torch.equal(sc.images[0, :, tile[0], tile[1]], pool.images[i])
        assert torch.equal(sc.masks[t][tile], pool.masks[i])
        assert sc.masks[t].sum() == pool.masks[i].sum()  # nothing outside its tile
        assert sc.boxes[t].tolist() == (pool.boxes[i] + torch.tensor([c * 32, r * 32, c * 32, r * 32])).tolist()
    assert sc.masks.sum(0).max() == 1  # objects do not overlap


@pytest.mark.parametrize("objects, grid, match", [(["circle"] * 3, (2, 2), "4 classes"), ("circle", (1, 1), "classes"),
                                                  (["dog"] * 4, (2, 2), "class index"), ([9] * 4, (2, 2), "class index"),
                                                  ([0] * 4, (2, 0), "grid"), ([0] * 4, 4, "grid")])
def test_scene_bad_inputs(objects, grid, match):
    with pytest.raises(ValueError, match=match):
        data.scene(objects, grid=grid)


# ---- lecturekit train -------------------------------------------------------------------------------

def test_train_variant_flags_pick_recipe_and_out_path(monkeypatch, capsys):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        history = training.History(val_acc=[0.5], seconds=1.0)
        return models.course_model(pretrained=False), history

    monkeypatch.setattr(training, "train_course_model", fake)
    monkeypatch.setattr(data, "shapes", lambda n, seed=0, **k: data.ShapesBatch(
        torch.zeros(2, 3, 64, 64), torch.zeros(2, dtype=torch.long), torch.zeros(2, 64, 64, dtype=torch.bool),
        torch.zeros(2, 4), data.CLASSES))
    monkeypatch.setattr(data, "biased_shapes", lambda n, seed=0, bias=0.99: data.shapes(n, seed))
    assert cli.main(["train", "--pooling", "max", "--quiet"]) == 0
    assert calls[-1]["pooling"] == "max" and calls[-1]["bias"] is None
    assert calls[-1]["out"] == models.weights_path("gmp")
    assert cli.main(["train", "--biased", "--quiet"]) == 0
    assert calls[-1]["bias"] == training.BIAS and calls[-1]["out"] == models.weights_path("biased")
    assert cli.main(["train", "--biased", "--pooling", "max"]) == 2
    assert "choose one" in capsys.readouterr().err
