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
