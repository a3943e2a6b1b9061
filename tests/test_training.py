import numpy as np
import pytest
import torch

from lecturekit import data, models, training


def test_overfit_small_sample_reaches_full_training_accuracy():
    model = models.course_model(pretrained=False, seed=0)
    history = training.overfit_small_sample(model, n=32, steps=80, progress=False)
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
    make = lambda: models.course_model(pretrained=False)  # noqa: E731
    a = training.random_search(make, trials=3, steps=2, batch_size=4, seed=1, progress=False)
    b = training.random_search(make, trials=3, steps=2, batch_size=4, seed=1, progress=False)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert all(1e-4 <= r["lr"] <= 1e-1 and 1e-6 <= r["weight_decay"] <= 1e-2 for r in a)
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
                                           (dict(steps=1, lr=1e-3, schedule="cosine"), "schedule")])
def test_train_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.train(models.course_model(pretrained=False), progress=False, **kwargs)


def test_train_course_model_writes_loadable_weights(tmp_path, monkeypatch):
    out = tmp_path / "w.pt"
    model, history = training.train_course_model(steps=2, batch_size=8, out=out, val_size=8, progress=False)
    monkeypatch.setattr(models, "WEIGHTS_PATH", out)
    loaded = models.course_model()
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    assert torch.load(out, weights_only=True)["recipe"]["steps"] == 2
