"""The DESIGN.md vocabulary holds on every public signature of the lecture modules.

One name per idea: images are ``x``, the class is ``target: Target``, a layer is ``layer: Layer``, a
channel index is ``channel`` (``k`` is always a count), a unit's place is ``position=(y, x)``, prior
weights are ``<what>_weight``, randomness is ``seed=``, progress bars ``progress=``. The modules of
style and adversarial examples are checked too once they exist.
"""
import importlib
import inspect

import pytest

LECTURE_MODULES = ["features", "receptive_field", "attribution", "evaluation", "synthesis", "widgets",
                   "style", "adversarial"]

# name used somewhere in the field -> the DESIGN.md name
FORBIDDEN = {
    "images": "x", "img": "x", "imgs": "x", "inputs": "x",
    "c": "target", "cls": "target", "label": "target", "class_index": "target", "class_idx": "target",
    "unit": "channel", "filter_index": "channel", "channel_index": "channel",
    "y": "position=(y, x)", "pos": "position=(y, x)",
    "l2": "l2_weight", "tv": "tv_weight", "lam": "<what>_weight", "lambda_": "<what>_weight",
    "random_state": "seed", "rng": "seed= or generator=", "verbose": "progress", "show_progress": "progress",
    "n_steps": "steps", "iterations": "steps", "iters": "steps", "num_steps": "steps",
    "n_samples": "samples", "num_samples": "samples", "epsilon": "eps",
}

# name -> what its annotation must mention (any of)
ANNOTATED = {
    "target": ("Target",),
    "layer": ("Layer", "str"),  # objectives read activations by name: str there
    "layers": ("Layer", "str"),
    "channel": ("int",),
    "position": ("tuple[int, int]",),
    "x": ("Tensor",),
    "seed": ("int",),
    "progress": ("bool",),
    "k": ("int",),
    "steps": ("int",),
    "samples": ("int",),
}


def _public_functions(name):
    try:
        module = importlib.import_module(f"lecturekit.{name}")
    except ModuleNotFoundError:
        return []
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    found = []
    for attr in names:
        obj = getattr(module, attr)
        if inspect.isfunction(obj) and getattr(obj, "__module__", "").startswith(module.__name__):
            found.append((f"{name}.{attr}", obj))
    return found


FUNCTIONS = [item for name in LECTURE_MODULES for item in _public_functions(name)]


def test_the_walk_finds_the_techniques():
    names = {n for n, _ in FUNCTIONS}
    assert {"attribution.grad_cam", "synthesis.class_visualization", "features.top_patches",
            "evaluation.deletion_curve", "receptive_field.receptive_field"} <= names


@pytest.mark.parametrize("qualname,func", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_public_signature_follows_the_vocabulary(qualname, func):
    problems = []
    for p in inspect.signature(func).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in FORBIDDEN:
            problems.append(f"{p.name!r} should be {FORBIDDEN[p.name]!r}")
        if p.name.endswith(("_reg", "_lambda", "_coef", "_strength")):
            problems.append(f"{p.name!r}: a loss or prior weight is named <what>_weight")
        if p.name in ANNOTATED:
            annotation = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
            if p.annotation is p.empty or not any(word in annotation for word in ANNOTATED[p.name]):
                problems.append(f"{p.name!r} annotated {annotation!r}, expected one of {ANNOTATED[p.name]}")
    assert not problems, f"{qualname}: " + "; ".join(problems)


def test_the_check_can_fail():
    from lecturekit.hooks import renamed

    def bad(model, images, c, layer, l2=0.0):  # every mistake the walk looks for
        return images

    with pytest.raises(AssertionError, match=r"'images' should be 'x'.*'c' should be 'target'.*'layer' annotated"):
        test_public_signature_follows_the_vocabulary("bad", bad)

    @renamed(images="x")
    def good(x: "torch.Tensor", target: "Target", layer: "Layer"):
        return x

    test_public_signature_follows_the_vocabulary("good", good)  # the new names, behind the alias
