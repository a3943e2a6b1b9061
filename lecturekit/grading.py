"""What a graded cell imports: ``exercise()`` and the check helpers.

Students run graded cells. Each starts with ``lk.grading.exercise("saliency", points=2)`` and compares
their function with the lecturekit reference on fixed inputs (``check_close``, ``check_shape``,
``check``). A failure raises ``AssertionError`` whose message says *what* is wrong (shape, sign,
scale, which pixels) without giving the answer away.

The same helpers work in three places (see ``lecturekit.grader`` for the whole story):

* **in a student's notebook** they compare and raise, as above;
* **in the kernel that ``lecturekit grade`` runs** (a copy of lecturekit in a sandbox, where the
  functions an assignment grades are withheld: calling one returns a ``Withheld`` placeholder that
  any use turns into ``WithheldError``) they never decide anything: each check sends the student's
  value to the grader as JSON (tensors as base64 bytes, never pickle) on the kernel's display channel;
* **in the grader's own process**, which runs the instructor's solution, they record the reference
  value of every check, so that the grader compares the student's values with references that the
  student's code never saw.

The instructor's side (the assignment generator and the grader) is ``lecturekit.grader``; its names
are still reachable here (``lk.grading.grade``) with a DeprecationWarning.

Inline questions: an answer cell sets ``answer_x = "b"`` (a choice) or a number; its graded cell hands it
over with ``check_answer``, and the right answer, with why, is the solution's hidden test
(``expect``), which ``lecturekit assignments`` removes from the student's notebook (as nbgrader does).

Notebooks: assignments/00_what_the_network_learned, assignments/01_which_pixels_matter,
assignments/02_synthesizing_images, assignments/03_style, assignments/04_adversarial
"""
from __future__ import annotations

import base64
import contextlib
import contextvars
import re
import warnings

__all__ = ["exercise", "check", "check_tensor", "check_shape", "check_close", "check_source",
           "check_answer", "expect", "Withheld", "WithheldError"]

MIME = "application/vnd.lecturekit.answer+json"  # the display type that carries a graded cell's answers
ANSWER_BYTES = 32 * 2**20  # the largest tensor a graded cell may hand to the grader

try:  # present only in the copy of lecturekit that a graded kernel imports (written by lecturekit.grader)
    from ._sandbox import WITHHELD as _SANDBOX_WITHHELD
except ImportError:
    _SANDBOX_WITHHELD = None

_current: dict = {"id": None, "points": None}
# In the grader's process: the list that the check helpers append their references to (None otherwise).
_recorder: contextvars.ContextVar = contextvars.ContextVar("lecturekit_grading_recorder", default=None)


def _mode() -> str:
    if _SANDBOX_WITHHELD is not None:
        return "answers"
    return "reference" if _recorder.get() is not None else "student"


# ---------------------------------------------------------------------------------------------------
# Withheld references
# ---------------------------------------------------------------------------------------------------

class WithheldError(RuntimeError):
    """A student's code used a lecturekit function that the grader withholds while grading."""


class Withheld:
    """What a withheld lecturekit function returns in a graded kernel.

    A graded cell may pass it on (``check_close(ours, lk.attribution.saliency(model, x, y))``: the
    grader computes the reference itself) and compute with it (``ref.float()``, ``torch.cat``, ``+``:
    the result is the same placeholder), but reading it (``bool``, ``float``, ``len``, iterating,
    ``.numpy()`` into numpy, ``.item()``, ``.tolist()``...) raises ``WithheldError``, and a
    student's function that returns it scores zero.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def _error(self) -> WithheldError:
        return WithheldError(f"{self._name} is withheld while this notebook is graded (the grader computes "
                             "the reference itself): write the computation yourself")

    def _same(self, *args, **kwargs):
        return self

    def _refuse(self, *args, **kwargs):
        raise self._error()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("item", "tolist", "numpy", "data_ptr", "untyped_storage", "storage"):
            raise self._error()
        return self

    def __setattr__(self, name, value):
        raise self._error()

    def __repr__(self) -> str:
        return f"<withheld while grading: {self._name}>"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for value in [*args, *(kwargs or {}).values()]:
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(item, Withheld):
                    return item
        return NotImplemented

    __call__ = __getitem__ = __neg__ = __pos__ = __abs__ = __invert__ = _same
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _same
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _same
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = _same
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _same
    __bool__ = __float__ = __int__ = __index__ = __complex__ = __len__ = __iter__ = __contains__ = _refuse
    __array__ = __setitem__ = __delitem__ = __reduce__ = __reduce_ex__ = __format__ = _refuse
    __hash__ = None


def withheld(name: str) -> Withheld:
    """The placeholder a withheld function returns (the grader's copy of lecturekit calls this)."""
    return Withheld(name)


# ---------------------------------------------------------------------------------------------------
# Answers: what a graded kernel sends to the grader (JSON; tensors as base64 bytes, never pickle)
# ---------------------------------------------------------------------------------------------------

_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def encode_answer(value) -> dict:
    """A student's value as JSON: ``{"type": "tensor", "dtype", "shape", "requires_grad", "data"}``.

    ``data`` is the tensor's bytes (little-endian, C order) in base64. Anything else is sent as its
    type name (a check of it fails in the grader), and a withheld placeholder says which function.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - every graded kernel has torch
        torch = None
    if isinstance(value, Withheld) or type(value).__name__ == "Withheld":  # also from a reloaded module
        with contextlib.suppress(Exception):
            return {"type": "withheld", "name": str(object.__getattribute__(value, "_name"))}
    if torch is not None and type(value) is torch.Tensor or (torch is not None and isinstance(value, torch.Tensor)):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        if str(t.dtype).replace("torch.", "") not in _DTYPES:
            return {"type": f"tensor of dtype {t.dtype}"}
        if t.numel() * t.element_size() > ANSWER_BYTES:
            return {"type": f"tensor of {t.numel() * t.element_size() / 2**20:.0f} MB (more than a graded answer may be)"}
        data = t.contiguous().numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        return {"type": "tensor", "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                "requires_grad": bool(value.requires_grad), "data": base64.b64encode(data).decode("ascii")}
    return {"type": type(value).__name__}


def decode_answer(answer) -> object:
    """The value ``encode_answer`` sent: a ``torch.Tensor``, or a ``_Unreadable`` naming what came instead."""
    import numpy as np
    import torch

    if not isinstance(answer, dict) or not isinstance(answer.get("type"), str):
        return _Unreadable("an unreadable answer")
    if answer["type"] == "withheld":
        return _Unreadable(f"the value of {str(answer.get('name'))[:80]}, which is withheld while grading",
                           withheld=True)
    if answer["type"] != "tensor":
        return _Unreadable(answer["type"][:80])
    try:
        dtype, shape = answer["dtype"], answer["shape"]
        if dtype not in _DTYPES or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise ValueError("bad dtype or shape")
        raw = base64.b64decode(answer["data"], validate=True)
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        tensor = torch.from_numpy(array.astype(np.dtype(dtype), copy=True))
    except Exception:
        return _Unreadable("an unreadable tensor")
    return tensor.requires_grad_(True) if answer.get("requires_grad") is True and tensor.is_floating_point() else tensor


class _Unreadable:
    """A value the grader cannot compare (not a tensor, or a withheld placeholder)."""

    def __init__(self, what: str, withheld: bool = False):
        self.what, self.withheld = what, withheld


def _emit(record: dict) -> None:
    """A graded kernel hands one check's record to the grader: a display message the grader reads."""
    try:
        from IPython.display import display

        display({MIME: record}, raw=True)
    except Exception:  # not in a kernel: nothing reads it
        pass


def _record(record: dict) -> bool:
    """Send or record a check: True when the caller should go on to decide the check itself."""
    mode = _mode()
    if mode == "answers":
        record = {k: (encode_answer(v) if k == "value" else v) for k, v in record.items() if k != "reference"}
        _emit(dict(record, exercise=_current["id"]))
        return False
    if mode == "reference":
        _recorder.get().append(dict(record, exercise=_current["id"]))
    return True


# ---------------------------------------------------------------------------------------------------
# The checks: each a pure function that returns what is wrong (or None), and the helper that raises
# ---------------------------------------------------------------------------------------------------

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


def _prefix(what: str, exercise_id: str | None = None) -> str:
    exercise_id = exercise_id if exercise_id is not None else _current["id"]
    return f"[{exercise_id}] {what}" if exercise_id else what


def _fail(message: str | None, value=None):
    if message is not None:
        raise AssertionError(_prefix(message))
    return value


def check(condition, message: str) -> None:
    """A property check: raise ``AssertionError(message)`` when ``condition`` is false.

    Unlike a bare ``assert``, it runs also under ``python -O`` and names the current exercise. In a
    graded kernel the condition is evaluated there, by the student's code: it can fail a submission
    but never pass one on its own (the grader's value checks decide).
    """
    try:
        ok, error = bool(condition), ""
    except Exception as err:  # e.g. a withheld value
        ok, error = False, f" ({type(err).__name__}: {err})"
    if _record({"check": "check", "ok": ok, "message": str(message)[:400] + error}):
        _fail(None if ok else message + error)


def tensor_problem(value, what: str = "your result") -> str | None:
    """What is wrong with ``value`` as a graded result (not a finite, detached tensor), or None."""
    import torch

    if isinstance(value, _Unreadable):
        return f"{what} is {value.what}" + (": write the computation yourself" if value.withheld else
                                             ", not a torch.Tensor")
    if isinstance(value, Withheld):
        return f"{what} comes from {object.__getattribute__(value, '_name')}, which is withheld while grading"
    if not isinstance(value, torch.Tensor):
        return f"{what} should be a torch.Tensor, got {type(value).__name__}"
    if value.requires_grad:
        return f"{what} still requires grad: return a detached tensor (.detach())"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return f"{what} contains NaN or inf"
    return None


def check_tensor(value, what: str = "your result"):
    """``value`` is a finite, detached ``torch.Tensor``; returns it."""
    if _record({"check": "tensor", "what": what, "value": value}):
        _fail(tensor_problem(value, what))
    return value


def shape_problem(value, shape, what: str = "your result") -> str | None:
    """What is wrong with ``value``'s shape (``None`` entries of ``shape`` match any size), or None."""
    problem = tensor_problem(value, what)
    if problem:
        return problem
    got = tuple(value.shape)
    if len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got)):
        return None
    hint = ""
    if len(got) == len(shape) + 1:
        hint = " (one dimension too many: is a reduction missing?)"
    elif len(got) + 1 == len(shape):
        hint = " (one dimension too few: did you reduce over one dimension too many?)"
    return f"{what} should have shape {tuple(shape)}, got {got}{hint}"


def check_shape(value, shape, what: str = "your result"):
    """``value`` is a tensor of exactly ``shape`` (a tuple; ``None`` entries match any size)."""
    if _record({"check": "shape", "what": what, "value": value, "shape": _plain_shape(shape)}):
        _fail(shape_problem(value, shape, what))
    return value


def _plain_shape(shape):
    try:
        return [None if s is None else int(s) for s in shape]
    except Exception:
        return None


def check_source(func, no_loops: bool = False, forbidden: tuple = (), what: str | None = None) -> None:
    """Property checks on the source of a student's function (read with ``inspect``, parsed with ``ast``).

    ``no_loops``: no ``for``/``while`` loop and no comprehension (a loop-free, vectorised answer).
    ``forbidden``: attribute names the function must not call, e.g. ``("saliency",)`` rejects
    ``lk.attribution.saliency(...)``, so that an exercise is not answered by calling the reference.
    When grading, the grader also withholds every function named in ``forbidden``.
    """
    message = source_problem(func, no_loops, forbidden, what)
    if _record({"check": "source", "ok": message is None, "message": message or "", "forbidden": list(forbidden)}):
        _fail(message)


def source_problem(func, no_loops: bool = False, forbidden: tuple = (), what: str | None = None) -> str | None:
    """What ``check_source`` finds wrong with ``func``'s source, or None."""
    import ast
    import inspect
    import textwrap

    what = what or f"{getattr(func, '__name__', 'your function')}()"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return f"cannot read the source of {what}: define it with `def` in a notebook cell"
    loops = (ast.For, ast.While, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    for node in ast.walk(tree):
        if no_loops and isinstance(node, loops):
            return (f"{what} uses a loop or comprehension (line {node.lineno} of the function); "
                    "write it with tensor operations only")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in forbidden:
            return f"{what} calls {ast.unparse(node.func)}(): write the computation yourself"
    return None


def _where(wrong) -> str:
    """Where a map (N, H, W) or image batch (N, C, H, W) is wrong: the first wrong image, its rows and columns."""
    first = wrong.nonzero()[0].tolist()  # index of the first wrong entry
    n = first[0]
    plane = wrong[tuple(first[:-2])]  # (H, W) of that image (and channel)
    rows, cols = plane.any(1).nonzero().flatten(), plane.any(0).nonzero().flatten()
    where = f"image {n}" + (f", channel {first[1]}" if wrong.dim() == 4 else "")
    return (f"; in {where}, {plane.float().mean().item():.0%} of the pixels differ, within rows "
            f"{int(rows.min())}-{int(rows.max())} and columns {int(cols.min())}-{int(cols.max())}")


def close_problem(value, reference, what: str = "your result", rtol: float = 1e-3, atol: float = 1e-5,
                  scale_free: bool = False) -> str | None:
    """What is wrong with ``value`` against ``reference`` (``check_close``'s diagnosis), or None."""
    import torch

    reference = reference.detach()
    problem = shape_problem(value, tuple(reference.shape), what)
    if problem:
        return problem
    s = value.detach().to(reference.dtype).cpu().flatten()
    r = reference.cpu().flatten()
    rr = (r * r).sum()
    c = float((s * r).sum() / rr) if rr > 0 else 0.0  # least-squares factor s ~ c r
    if scale_free and c > 0:
        s = s / c
    if torch.allclose(s, r, rtol=rtol, atol=atol):
        return None
    norm = lambda t: t.norm().item()  # noqa: E731
    if norm(r) == 0:
        return f"{what} should be all zeros here, but is not (largest entry {s.abs().max().item():.3g})"
    if norm(s) == 0:
        return f"{what} is all zeros; it should not be"
    if s.numel() == 1:
        return f"{what} is not the expected value: it is about {c:.3g} times what it should be"
    residual = norm(s - c * r) / norm(s)
    if residual < 1e-3 and c < 0:
        return f"{what} has the opposite sign of the expected result: check a sign or a subtraction"
    if residual < 1e-3 and not scale_free:
        return (f"{what} has the right pattern but the wrong scale (about {c:.3g} times the "
                "expected values): check a normalisation, a mean versus a sum, or a factor")
    wrong = ~torch.isclose(s, r, rtol=rtol, atol=atol)
    message = f"{what} differs from the expected result at {wrong.float().mean().item():.0%} of its entries"
    if s.numel() >= 16:
        message += f" (correlation {torch.corrcoef(torch.stack([s, r]))[0, 1].item():.2f})"
    if reference.dim() >= 3:
        message += _where(wrong.view(reference.shape))
    if (r >= 0).all() and (s < 0).any():
        message += "; it has negative entries where none are expected"
    return message


def check_close(value, reference, what: str = "your result", rtol: float = 1e-3, atol: float = 1e-5,
                scale_free: bool = False):
    """``value`` matches ``reference`` (the lecturekit answer) up to ``rtol``/``atol``.

    On a mismatch the message diagnoses without revealing the reference: wrong type or shape, NaN,
    the opposite sign, the right pattern at the wrong scale (and by which factor), or which entries
    (for maps: which image, rows and columns) differ, with the correlation to the answer.
    ``scale_free=True`` accepts any positive multiple of the reference (for maps whose scale is free).
    """
    if _record({"check": "close", "what": what, "value": value, "rtol": float(rtol), "atol": float(atol),
                "scale_free": bool(scale_free), "reference": reference}):
        if isinstance(reference, Withheld):
            raise reference._error()
        _fail(close_problem(value, reference, what, rtol, atol, scale_free))
    return value


# ---------------------------------------------------------------------------------------------------
# Inline questions: a choice or a number, graded by the grader; the right answer lives in hidden tests
# ---------------------------------------------------------------------------------------------------

ANSWER_CHARS = 200  # the longest answer a graded cell sends


def plain_answer(value) -> dict:
    """A student's answer to an inline question as JSON: ``{"type": "str"|"number"|"none", "value"}``."""
    if value is None:
        return {"type": "none"}
    if isinstance(value, str):
        return {"type": "str", "value": value[:ANSWER_CHARS]}
    if isinstance(value, bool):
        return {"type": "bool"}
    try:  # int, float, numpy or torch scalars
        import math
        import numbers

        number = float(value) if isinstance(value, numbers.Number) or hasattr(value, "__float__") else None
        if number is not None and math.isfinite(number) and not isinstance(value, Withheld):
            return {"type": "number", "value": number}
    except Exception:
        pass
    return {"type": type(value).__name__[:80]}


def _normalise(answer):
    return answer.strip().lower() if isinstance(answer, str) else answer


def answer_problem(answer: dict, expected=None, choices=None, tolerance: float = 0.0, because: str = "",
                   what: str = "your answer") -> str | None:
    """What is wrong with a student's answer (``plain_answer``'s JSON), or None.

    Without ``expected`` only the form is judged: an answer was given, and it is one of ``choices``.
    A wrong answer's message ends with ``because`` (the instructor's explanation).
    """
    kind, value = answer.get("type"), answer.get("value")
    if kind == "none":
        return f"{what}: no answer given yet (set the variable in the answer cell above)"
    if choices:
        options = [_normalise(c) for c in choices]
        if kind != "str" or _normalise(value) not in options:
            got = repr(value) if kind in ("str", "number") else f"a {kind}"
            return f"{what}: expected one of {', '.join(repr(c) for c in choices)}, got {got}"
    elif kind != "number" and isinstance(expected, (int, float)):
        return f"{what}: expected a number, got a {kind}"
    if expected is None:
        return None
    if isinstance(expected, str):
        right = kind == "str" and _normalise(value) == _normalise(expected)
    else:
        # float32 rounding (an answer computed as a tensor) is not a wrong answer
        right = kind == "number" and abs(float(value) - float(expected)) <= float(tolerance) + 1e-6 * max(1.0, abs(float(expected)))
    if right:
        return None
    return f"{what}: {value!r} is not the right answer." + (f" {because}" if because else "")


def check_answer(value, what: str = "your answer", choices=None) -> None:
    """Hand the answer to an inline question (a choice among ``choices``, or a number) to the grader.

    In a student's notebook this checks the form only (an answer was given, one of the choices): the
    right answer is not in the assignment. The grader compares the value with the instructor's
    (recorded from the solution, where ``expect`` in the cell's hidden tests gives the explanation
    a report shows); nbgrader restores those hidden tests and runs ``expect`` itself.
    """
    choices = tuple(str(c) for c in choices) if choices else None
    record = {"check": "answer", "what": what, "answer": plain_answer(value), "choices": list(choices or ())}
    if _mode() == "reference":
        record["expected"] = record["answer"].get("value")
    if _record(record):
        _fail(answer_problem(record["answer"], None, choices, what=what))


def expect(value, answer, because: str, tolerance: float = 0.0, what: str = "your answer") -> None:
    """The right answer to an inline question and why: the hidden test of a question's graded cell.

    ``lecturekit assignments`` (like nbgrader) removes hidden tests from the student's notebook. In
    the grader's run of the solution it adds ``answer``, ``tolerance`` and ``because`` to the cell's
    last ``check_answer``; in a notebook run by nbgrader's autograde (or the instructor) it raises
    ``AssertionError`` with the explanation when ``value`` is wrong.
    """
    if not isinstance(because, str) or not because.strip():
        raise ValueError(f"expected an explanation (because=) for the answer {answer!r}, got {because!r}")
    mode = _mode()
    if mode == "answers":
        return  # a graded kernel never sees hidden tests; the grader decides
    if mode == "reference":
        records = [r for r in _recorder.get() if r.get("check") == "answer"]
        if not records:
            raise ValueError("expect() needs a check_answer() before it in the same graded cell")
        records[-1].update(expected=answer, tolerance=float(tolerance), because=because)
        what = records[-1]["what"]
    _fail(answer_problem(plain_answer(value), answer, None, tolerance, because, what))


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
