"""What a graded cell imports: ``exercise()`` and the check helpers.

Students run graded cells. Each starts with ``lk.grading.exercise("saliency", points=2)`` and compares
their function with the lecturekit reference on fixed inputs (``check_close``, ``check_shape``,
``check``). A failure raises ``AssertionError`` whose message says *what* is wrong (shape, sign,
scale, which pixels) without giving the answer away.

The instructor's side (the assignment generator and the nbval grader) is ``lecturekit.grader``;
its names are still reachable here (``lk.grading.grade``) with a DeprecationWarning.

Notebooks: assignments/01_which_pixels_matter, assignments/02_synthesizing_images
"""
from __future__ import annotations

import re
import warnings

__all__ = ["exercise", "check", "check_tensor", "check_shape", "check_close", "check_source"]


_current: dict = {"id": None, "points": None}


def exercise(id: str, points: float) -> None:
    """Declare the exercise a graded cell grades: the first line of every graded cell.

    The grader reads this line from the notebook's source (it does not need to run it) to know which
    cells score which exercise and how many points; at run time it names the exercise in messages.
    """
    if not isinstance(id, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", id):
        raise ValueError(f"expected an exercise id made of letters, digits, '_' or '-', got {id!r}")
    if not isinstance(points, (int, float)) or points <= 0:
        raise ValueError(f"expected a positive number of points, got {points!r}")
    _current.update(id=id, points=float(points))


def _prefix(what: str) -> str:
    return f"[{_current['id']}] {what}" if _current["id"] else what


def check(condition, message: str) -> None:
    """A property check: raise ``AssertionError(message)`` when ``condition`` is false.

    Unlike a bare ``assert``, it runs also under ``python -O`` and names the current exercise.
    """
    if not bool(condition):
        raise AssertionError(_prefix(message))


def check_tensor(value, what: str = "your result"):
    """``value`` is a finite, detached ``torch.Tensor``; returns it."""
    import torch

    check(isinstance(value, torch.Tensor), f"{what} should be a torch.Tensor, got {type(value).__name__}")
    check(not value.requires_grad, f"{what} still requires grad: return a detached tensor (.detach())")
    if value.is_floating_point():
        check(bool(torch.isfinite(value).all()), f"{what} contains NaN or inf")
    return value


def check_shape(value, shape, what: str = "your result"):
    """``value`` is a tensor of exactly ``shape`` (a tuple; ``None`` entries match any size)."""
    check_tensor(value, what)
    got = tuple(value.shape)
    ok = len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got))
    if not ok:
        hint = ""
        if len(got) == len(shape) + 1:
            hint = " (one dimension too many: is a reduction missing?)"
        elif len(got) + 1 == len(shape):
            hint = " (one dimension too few: did you reduce over one dimension too many?)"
        check(False, f"{what} should have shape {tuple(shape)}, got {got}{hint}")
    return value


def check_source(func, no_loops: bool = False, forbidden: tuple = (), what: str | None = None) -> None:
    """Property checks on the source of a student's function (read with ``inspect``, parsed with ``ast``).

    ``no_loops``: no ``for``/``while`` loop and no comprehension (a loop-free, vectorised answer).
    ``forbidden``: attribute names the function must not call, e.g. ``("saliency",)`` rejects
    ``lk.attribution.saliency(...)``, so that an exercise is not answered by calling the reference.
    """
    import ast
    import inspect
    import textwrap

    what = what or f"{getattr(func, '__name__', 'your function')}()"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        check(False, f"cannot read the source of {what}: define it with `def` in a notebook cell")
    loops = (ast.For, ast.While, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    for node in ast.walk(tree):
        if no_loops and isinstance(node, loops):
            check(False, f"{what} uses a loop or comprehension (line {node.lineno} of the function); "
                         "write it with tensor operations only")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in forbidden:
            check(False, f"{what} calls {ast.unparse(node.func)}(): write the computation yourself")


def _where(wrong) -> str:
    """Where a map (N, H, W) or image batch (N, C, H, W) is wrong: the first wrong image, its rows and columns."""
    first = wrong.nonzero()[0].tolist()  # index of the first wrong entry
    n = first[0]
    plane = wrong[tuple(first[:-2])]  # (H, W) of that image (and channel)
    rows, cols = plane.any(1).nonzero().flatten(), plane.any(0).nonzero().flatten()
    where = f"image {n}" + (f", channel {first[1]}" if wrong.dim() == 4 else "")
    return (f"; in {where}, {plane.float().mean().item():.0%} of the pixels differ, within rows "
            f"{int(rows.min())}-{int(rows.max())} and columns {int(cols.min())}-{int(cols.max())}")


def check_close(value, reference, what: str = "your result", rtol: float = 1e-3, atol: float = 1e-5,
                scale_free: bool = False):
    """``value`` matches ``reference`` (the lecturekit answer) up to ``rtol``/``atol``.

    On a mismatch the message diagnoses without revealing the reference: wrong type or shape, NaN,
    the opposite sign, the right pattern at the wrong scale (and by which factor), or which entries
    (for maps: which image, rows and columns) differ, with the correlation to the answer.
    ``scale_free=True`` accepts any positive multiple of the reference (for maps whose scale is free).
    """
    import torch

    reference = reference.detach()
    check_shape(value, tuple(reference.shape), what)
    s = value.detach().to(reference.dtype).cpu().flatten()
    r = reference.cpu().flatten()
    rr = (r * r).sum()
    c = float((s * r).sum() / rr) if rr > 0 else 0.0  # least-squares factor s ~ c r
    if scale_free and c > 0:
        s = s / c
    if torch.allclose(s, r, rtol=rtol, atol=atol):
        return value
    norm = lambda t: t.norm().item()  # noqa: E731
    if norm(r) == 0:
        check(False, f"{what} should be all zeros here, but is not (largest entry {s.abs().max().item():.3g})")
    if norm(s) == 0:
        check(False, f"{what} is all zeros; it should not be")
    if s.numel() == 1:
        check(False, f"{what} is not the expected value: it is about {c:.3g} times what it should be")
    residual = norm(s - c * r) / norm(s)
    if residual < 1e-3 and c < 0:
        check(False, f"{what} has the opposite sign of the expected result: check a sign or a subtraction")
    if residual < 1e-3 and not scale_free:
        check(False, f"{what} has the right pattern but the wrong scale (about {c:.3g} times the "
                     "expected values): check a normalisation, a mean versus a sum, or a factor")
    wrong = ~torch.isclose(s, r, rtol=rtol, atol=atol)
    message = f"{what} differs from the expected result at {wrong.float().mean().item():.0%} of its entries"
    if s.numel() >= 16:
        message += f" (correlation {torch.corrcoef(torch.stack([s, r]))[0, 1].item():.2f})"
    if reference.dim() >= 3:
        message += _where(wrong.view(reference.shape))
    if (r >= 0).all() and (s < 0).any():
        message += "; it has negative entries where none are expected"
    check(False, message)


_MOVED_TO_GRADER = ("make_assignment", "assignment_text", "write_assignments", "solution_blocks", "graded_cells",
                    "grade", "grade_folder", "Exercise", "Report", "format_report", "reports_to_csv", "BEGIN", "END",
                    "STUB", "MARKDOWN_STUB", "MESSAGE_CHARS", "LOG_BYTES")


def __getattr__(name):
    # The instructor's tools moved to lecturekit.grader (issue 9); old imports keep working for a while.
    if name in _MOVED_TO_GRADER:
        from . import grader

        warnings.warn(f"lecturekit.grading.{name} moved to lecturekit.grader.{name}", DeprecationWarning, stacklevel=2)
        return getattr(grader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
