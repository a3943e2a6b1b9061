import numpy as np
import pytest
import torch

from lecturekit import data, models, training


def test_overfit_small_sample_reaches_full_training_accuracy():
    model = training.trainable_model(seed=0)
    history = training.overfit_small_sample(model, n=32, steps=60, progress=False)
    sample = data.shapes(32, seed=1000)
    assert training.evaluate(model, sample) == 1.0
    assert history.loss[-1] < history.loss[0] / 5


def test_train_is_seeded_and_records_history():
    runs = []
    for _ in range(2):
        model = models.course_model(pretrained=False, seed=0)
        runs.append(training.train(model, steps=3, lr=1e-3, batch_size=8, seed=4, progress=False,
                                   val=data.shapes(16, seed=training.VALIDATION_SEED), val_every=2))
    assert runs[0].loss == runs[1].loss and len(runs[0].loss) == 3
    assert runs[0].val_step == [1, 2] and len(runs[0].val_acc) == 2
    assert not model.training


def test_training_seeds_never_meet_held_out_seeds():
    assert training.TRAIN_SEED_OFFSET > max(training.VALIDATION_SEED, training.TEST_SEED, 99, 31337)


def test_random_search_is_log_uniform_and_seeded():
    make = lambda: training.trainable_model()  # noqa: E731
    a = training.random_search(make, trials=3, steps=2, batch_size=4, seed=1, progress=False)
    b = training.random_search(make, trials=3, steps=2, batch_size=4, seed=1, progress=False)
    assert [r["lr"] for r in a] == [r["lr"] for r in b] and [r["final_loss"] for r in a] == [r["final_loss"] for r in b]
    assert all(1e-3 <= r["lr"] <= 1 and 1e-6 <= r["weight_decay"] <= 1e-2 for r in a)
    # log-uniform: the exponent, not the value, is uniform
    rng = np.random.default_rng(0)
    exps = rng.uniform(-4, -1, 2000)
    assert abs(np.median(10 ** exps) - 10 ** -2.5) < 1e-3


def test_huge_learning_rate_stops_on_nan_instead_of_looping():
    model = models.course_model(pretrained=False)
    history = training.train(model, steps=50, lr=1e6, batch_size=16, progress=False)
    assert len(history.loss) <= 50
    assert not np.isfinite(history.loss[-1]) or history.loss[-1] > 1.5


@pytest.mark.parametrize("kwargs, match", [(dict(steps=0, lr=1e-3), "steps"), (dict(steps=1, lr=0), "learning rate"),
                                           (dict(steps=1, lr=1e-3, schedule="cosine"), "schedule"),
                                           (dict(steps=1, lr=1e-3, optimizer="rmsprop"), "optimizer")])
def test_train_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.train(models.course_model(pretrained=False), progress=False, **kwargs)


def test_train_course_model_writes_loadable_weights(tmp_path, monkeypatch):
    out = tmp_path / "w.pt"
    model, history = training.train_course_model(steps=2, batch_size=8, out=out, val_size=8, progress=False)
    monkeypatch.setattr(models, "WEIGHTS_PATH", out)
    loaded = models.course_model()
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules()), "the saved model is plain"
    assert torch.load(out, weights_only=True)["recipe"]["steps"] == 2


def test_validating_less_often_trains_the_same_weights():
    """train_course_model validates once at the end: validation must not touch the training itself
    (batch-norm statistics, the data stream, the random state)."""
    val = data.shapes(8, seed=training.VALIDATION_SEED)
    runs = []
    for val_every in (1, 4):
        model = training.trainable_model(seed=0)
        history = training.train(model, 4, 0.05, 1e-4, 8, seed=0, val=val, val_every=val_every,
                                 schedule="onecycle", progress=False)
        runs.append((model.state_dict(), history))
    (often, h_often), (once, h_once) = runs
    assert len(h_often.val_acc) == 4 and len(h_once.val_acc) == 1
    assert all(torch.equal(often[k], once[k]) for k in often)
    assert h_often.val_acc[-1] == h_once.val_acc[-1] and h_often.loss == h_once.loss


def test_fuse_batchnorm_gives_the_same_outputs():
    model = training.trainable_model(seed=3)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # give the running statistics something other than 0 and 1
            model(torch.rand(16, 3, 64, 64) * 0.8)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        torch.nn.init.uniform_(bn.weight, 0.5, 2)
        torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
    model.eval()
    plain = models.fuse_batchnorm(model)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-4)
    assert [type(m) for m in plain.features] == [type(m) for m in models.CourseNet().features]
    with pytest.raises(ValueError, match="batchnorm=True"):
        models.fuse_batchnorm(models.CourseNet())


def test_recipe_steps_train_on_a_given_sample_and_image_size():
    """lr_sweep and random_search with ``sample`` equal train(..., sample=) run by hand; overfit_small_sample
    with ``size`` memorises images of that size (notebook 00 runs the recipe on 32 x 32 images)."""
    pool = data.shapes(12, seed=5, size=32)
    make = lambda: training.trainable_model(seed=0)  # noqa: E731
    by_hand = training.train(make(), 3, 0.05, 1e-4, 4, seed=0, sample=pool, progress=False)
    sweep = training.lr_sweep(make, [0.05], steps=3, batch_size=4, sample=pool, progress=False)
    assert sweep[0.05].loss == by_hand.loss
    trial = training.random_search(make, trials=1, steps=3, lr_range=(0.05, 0.05), wd_range=(1e-4, 1e-4),
                                   batch_size=4, sample=pool, progress=False)[0]
    assert trial["history"].loss == by_hand.loss
    fresh = training.lr_sweep(make, [0.05], steps=3, batch_size=4, progress=False)[0.05]
    assert fresh.loss != by_hand.loss  # without sample: fresh 64 x 64 images
    model = training.trainable_model(seed=0)
    training.overfit_small_sample(model, n=16, steps=40, size=32, progress=False)
    assert training.evaluate(model, data.shapes(16, seed=1000, size=32)) == 1.0
