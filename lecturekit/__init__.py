"""lecturekit: reference implementations and widgets for the course "Visualizing and Understanding CNNs".

    import lecturekit as lk
    batch = lk.data.shapes(64, seed=0)
    model = lk.models.course_model()

Modules follow the lecture (see DESIGN.md): data, models, hooks, training, plotting, and one module
per family of techniques. Importing lecturekit runs nothing heavy.
"""
from importlib import import_module

__version__ = "0.1.0"

_SUBMODULES = ("data", "models", "hooks", "training", "plotting", "features", "receptive_field", "attribution", "incremental",
               "evaluation", "synthesis", "style", "adversarial", "widgets", "grading", "grader", "colab", "cli")


def __getattr__(name):
    # Submodules load on first use (lk.features, lk.widgets, ...): importing lecturekit stays cheap,
    # and a module that is not built yet fails only when it is used.
    if name in _SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
