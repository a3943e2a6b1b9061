"""The grader is proven: checks, the assignment generator, the grader and the catalogue of wrong answers.

(The attacks of a dishonest submission have their own catalogue: tests/test_grader_attacks.py.)

Fast tests first (check helpers, generator), then grader runs. Grader runs are the slow part: every
notebook that needs grading is graded once, two at a time, by the session fixtures below, and the
tests only read the reports. Each known wrong answer is graded on a notebook that holds the setup
cells and the cells of the exercises it touches (several wrong answers to *different* exercises
share one notebook).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
import torch

from lecturekit import grader, grading

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
ASSIGNMENTS = ROOT / "assignments"
A1, A2 = "01_which_pixels_matter.ipynb", "02_synthesizing_images.ipynb"
A3 = "03_style.ipynb"
A4 = "04_adversarial.ipynb"
A0 = "00_what_the_network_learned.ipynb"
# Assignments whose solutions call the student's earlier functions (style_loss calls gram): a wrong
# answer is graded in the whole notebook, not in its exercise alone.
BUILDS_ON_EARLIER_EXERCISES = {A3}


# ---- check helpers -----------------------------------------------------------------------------------

def test_check_close_accepts_the_reference_and_names_shape_sign_scale_and_pixels():
    ref = torch.rand(2, 8, 8) + 0.1
    assert grading.check_close(ref.clone(), ref) is not None
    with pytest.raises(AssertionError, match=r"shape \(2, 8, 8\), got \(2, 3, 8, 8\).*reduction"):
        grading.check_close(ref[:, None].expand(2, 3, 8, 8).clone(), ref)
    with pytest.raises(AssertionError, match="opposite sign"):
        grading.check_close(-ref, ref)
    with pytest.raises(AssertionError, match=r"wrong scale \(about 0.5 times"):
        grading.check_close(ref / 2, ref)
    assert grading.check_close(ref * 3, ref, scale_free=True) is not None
    wrong = ref.clone()
    wrong[1, 2:4, 5:7] += 1
    with pytest.raises(AssertionError, match=r"in image 1, 6% of the pixels differ, within rows 2-3 and columns 5-6"):
        grading.check_close(wrong, ref, what="map")
    with pytest.raises(AssertionError, match="about 0.5 times what it should be"):
        grading.check_close(torch.tensor(1.0), torch.tensor(2.0))
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(AssertionError, match="in image 1, channel 2, 2% of the pixels differ, within rows 4-4"):
        grading.check_close(images + (torch.arange(images.numel()) == 64 * 5 + 4 * 8 + 1).view(2, 3, 8, 8), images)
    with pytest.raises(AssertionError, match="negative entries"):
        grading.check_close(ref - 0.5, ref.clamp(min=0.5) - 0.5 + 0.0 * ref)
    with pytest.raises(AssertionError, match="torch.Tensor, got list"):
        grading.check_close([1.0], torch.ones(1))
    with pytest.raises(AssertionError, match="requires grad"):
        grading.check_close(ref.clone().requires_grad_(True), ref)
    with pytest.raises(AssertionError, match="NaN"):
        grading.check_close(torch.full_like(ref, float("nan")), ref)


def test_messages_name_the_exercise_and_exercise_validates():
    grading.exercise("demo", points=1)
    with pytest.raises(AssertionError, match=r"^\[demo\] x should be 1"):
        grading.check(False, "x should be 1")
    with pytest.raises(ValueError, match="positive number of points"):
        grading.exercise("demo", points=0)
    with pytest.raises(ValueError, match="exercise id"):
        grading.exercise("two words", points=1)


def _loopy(x):
    return sum(v for v in x)


def _cheat(model, x, y):
    import lecturekit as lk

    return lk.attribution.saliency(model, x, y)


def _clean(x):
    return x[..., 1:] - x[..., :-1]


def test_check_source_finds_loops_and_forbidden_calls():
    with pytest.raises(AssertionError, match="loop or comprehension"):
        grading.check_source(_loopy, no_loops=True)
    with pytest.raises(AssertionError, match=r"calls lk.attribution.saliency\(\)"):
        grading.check_source(_cheat, forbidden=("saliency",))
    grading.check_source(_clean, no_loops=True, forbidden=("saliency",))


# ---- the generator -------------------------------------------------------------------------------------

def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbformat.v4.new_code_cell(c)
                for c in cells]
    return nb


def test_instructor_tools_moved_to_grader_and_old_names_warn():
    with pytest.warns(DeprecationWarning, match="moved to lecturekit.grader.grade"):
        assert grading.grade is grader.grade
    assert "grade" not in grading.__all__ and "exercise" not in grader.__all__


def test_make_assignment_keeps_indentation_and_clears_outputs():
    nb = _notebook("def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n",
                   "md:Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION")
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi")]
    nb.cells[0].execution_count = 3
    out = grader.make_assignment(nb)
    assert out.cells[0].source == "def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert out.cells[1].source == "Why?\nYOUR ANSWER HERE"
    assert out.cells[0].outputs == [] and out.cells[0].execution_count is None
    assert "2 * x" in nb.cells[0].source  # the solution notebook is not changed


@pytest.mark.parametrize("source,error", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
])
def test_unbalanced_markers_raise(source, error):
    with pytest.raises(ValueError, match=f"cell 0.*{error}"):
        grader.make_assignment(_notebook(source), "broken.ipynb")


def test_committed_assignments_are_what_the_command_generates():
    solutions = sorted(SOLUTIONS.glob("*.ipynb"))
    assert [p.name for p in solutions] == [A0, A1, A2, A3, A4]
    assert sorted(p.name for p in ASSIGNMENTS.glob("*.ipynb")) == [A0, A1, A2, A3, A4]
    stale = grader.write_assignments(SOLUTIONS, ASSIGNMENTS, check_only=True)
    assert not stale, f"assignments/ is out of date: run `lecturekit assignments` ({stale})"


def test_no_solution_text_leaks_into_assignments():
    for solution in sorted(SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(solution, as_version=4)
        blocks = grader.solution_blocks(nb)
        assert len(blocks) >= 4, f"{solution.name}: expected a solution block per exercise"
        outside = grader.make_assignment(nb)  # everything but the blocks
        outside_text = "\n".join(c.source for c in outside.cells)
        student = (ASSIGNMENTS / solution.name).read_text(encoding="utf-8")
        assert grader.BEGIN not in student and grader.END not in student
        for block in blocks:
            for line in block.splitlines():
                line = line.strip()
                if len(line) >= 12 and line not in outside_text:  # lines also in the scaffold are not leaks
                    assert json.dumps(line)[1:-1] not in student, f"{solution.name} leaks {line!r}"
        stubs = sum(student.count(stub) - solution.read_text(encoding="utf-8").count(stub)
                    for stub in ("raise NotImplementedError()", grading.MARKDOWN_STUB))  # code and answer blocks
        assert stubs == len(blocks)
        # the answers to inline questions (hidden tests) stay in solutions/ too
        hidden = grader.hidden_blocks(nb)
        assert grader.HIDDEN_BEGIN not in student and grader.HIDDEN_END not in student
        for block in hidden:
            assert "lk.grading.expect(" in block
            for line in block.splitlines():
                assert len(line.strip()) < 12 or json.dumps(line.strip())[1:-1] not in student, \
                    f"{solution.name} leaks its hidden test {line!r}"


def test_every_assignment_has_inline_questions_graded_and_by_hand():
    for solution in sorted(SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(solution, as_version=4)
        assert grader.hidden_blocks(nb), f"{solution.name}: no automatically graded inline question"
        assert grader.manual_cells(nb), f"{solution.name}: no free-text inline question"


# ---- inline questions: the helpers (no grader run) -------------------------------------------------------

def test_answer_problem_judges_choices_and_numbers_and_explains():
    def plain(v):
        return grading.plain_answer(v)

    assert grading.answer_problem(plain("B "), "b", ("a", "b")) is None  # case and spaces do not matter
    wrong = grading.answer_problem(plain("a"), "b", ("a", "b"), because="Because of X.", what="question 1")
    assert wrong == "question 1: 'a' is not the right answer. Because of X."
    assert "expected one of 'a', 'b', got 'z'" in grading.answer_problem(plain("z"), "b", ("a", "b"))
    assert "no answer given" in grading.answer_problem(plain(None), "b", ("a", "b"))
    assert grading.answer_problem(plain(0.395), 0.39, tolerance=0.02) is None
    assert grading.answer_problem(plain(torch.tensor(0.39)), 0.39) is None  # a tensor scalar is a number
    assert "not the right answer" in grading.answer_problem(plain(0.625), 0.39, tolerance=0.02)
    assert "expected a number, got a str" in grading.answer_problem(plain("0.39"), 0.39, tolerance=0.02)
    assert grading.plain_answer(True) == {"type": "bool"} and grading.plain_answer([1]) == {"type": "list"}


def test_check_answer_checks_the_form_and_expect_the_answer_in_a_students_notebook():
    grading.exercise("q", points=1)
    grading.check_answer("b", choices=("a", "b"), what="question 1")  # the right answer is not known here
    with pytest.raises(AssertionError, match=r"^\[q\] question 1: no answer given"):
        grading.check_answer(None, choices=("a", "b"), what="question 1")
    with pytest.raises(AssertionError, match="expected one of 'a', 'b', got 'c'"):
        grading.check_answer("c", choices=("a", "b"))
    grading.expect("b", "b", because="Why.")  # what nbgrader's autograde runs (hidden tests)
    with pytest.raises(AssertionError, match=r"'a' is not the right answer. Why\."):
        grading.expect("a", "b", because="Why.")
    with pytest.raises(ValueError, match="explanation"):
        grading.expect("a", "b", because="")


def test_make_assignment_removes_hidden_tests():
    nb = _notebook("answer = None\n### BEGIN SOLUTION\nanswer = 'b'\n### END SOLUTION",
                   "lk.grading.exercise('q', points=1)\nlk.grading.check_answer(answer)\n### BEGIN HIDDEN TESTS\n"
                   "lk.grading.expect(answer, 'b', because='Why.')\n### END HIDDEN TESTS\nprint('done')")
    out = grader.make_assignment(nb)
    assert out.cells[1].source == "lk.grading.exercise('q', points=1)\nlk.grading.check_answer(answer)\nprint('done')"
    assert grader.hidden_blocks(nb) == ["lk.grading.expect(answer, 'b', because='Why.')"]
    with pytest.raises(ValueError, match="never closed"):
        grader.make_assignment(_notebook("### BEGIN HIDDEN TESTS\nx = 1"))


# ---- the grader on small synthetic assignments --------------------------------------------------------

SETUP = "import torch\nfrom lecturekit import grading"


def _write(path: Path, *cells) -> Path:
    nbformat.write(_notebook(*cells), path)
    return path


def _function(name: str, body: str = "return x + 1") -> str:
    return f"def {name}(x):\n    ### BEGIN SOLUTION\n    {body}\n    ### END SOLUTION"


def _graded(exercise: str, function: str, points: float = 1, x: float = 1.0, expected: float = 2.0) -> str:
    return (f"grading.exercise('{exercise}', points={points:g})\n"
            f"grading.check_close({function}(torch.tensor({x})), torch.tensor({expected}), what='{function}({x:g})')")


def _student(solution: Path, path: Path, **bodies) -> Path:
    """The solution notebook with the named functions' solution blocks replaced by other code."""
    nb = nbformat.read(solution, as_version=4)
    for cell in nb.cells:
        for name, body in bodies.items():
            if cell.source.startswith(f"def {name}(x):"):
                cell.source = f"def {name}(x):\n" + "\n".join("    " + line for line in body.splitlines())
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Reports of small submissions that misbehave in every way the issue names, graded two at a time.

    Two assignments (a solution notebook each, which is also the key): ``hw`` (double: 2 points, half:
    1.5 points) and ``five`` (five one-point exercises, each a function f(x) = x + 1). Also records
    the files of the submissions' folder and of the grader's working directory before and after, to
    show that what a submission writes stays in its scratch folder.
    """
    folder = tmp_path_factory.mktemp("synthetic")
    (folder / "student").mkdir()
    hw = _write(folder / "hw.ipynb", SETUP, _function("double", "return 2 * x"),
                _graded("double", "double", 2, 3.0, 6.0), _graded("half", "double", 1.5, 0.25, 0.5))
    five = _write(folder / "five.ipynb", SETUP, *(c for n in ("raises", "chatty", "writes", "loops", "after")
                                                  for c in (_function(f"f_{n}"), _graded(n, f"f_{n}"))))
    keys = {"hw": grader.load_key(hw), "five": grader.load_key(five)}
    bad = _student(five, folder / "student" / "bad.ipynb", f_raises="raise RuntimeError('boom')",
                   f_chatty="for _ in range(200):\n    print('x' * 50_000)\nreturn x + 1",
                   f_writes="open('junk.bin', 'wb').write(b'0' * 10**6)\nimport os\nos.makedirs('deep/er', "
                            "exist_ok=True)\nreturn x + 1",
                   f_loops="while True:\n    pass")
    good = _student(hw, folder / "good.ipynb", double="return x + x if x > 1 else x")  # right on 3, wrong on 0.25
    slow = folder / "slow.ipynb"
    slow_nb = nbformat.read(hw, as_version=4)  # the first exercise graded, then a cell that sleeps
    slow_nb.cells.insert(3, nbformat.v4.new_code_cell("import time\ntime.sleep(600)"))
    nbformat.write(slow_nb, slow)
    dies = nbformat.read(hw, as_version=4)
    dies.cells.insert(1, nbformat.v4.new_code_cell("import os\nos._exit(1)"))
    nbformat.write(dies, folder / "dies.ipynb")
    cheat = nbformat.read(hw, as_version=4)  # the check edited to pass a wrong function, 'half' deleted
    cheat.cells[1].source = "def double(x):\n    return x"
    cheat.cells[2].source = "grading.exercise('double', points=99)\npass"
    cheat.cells = cheat.cells[:3]
    nbformat.write(cheat, folder / "cheat.ipynb")
    jobs = {"good": (good, dict(against=keys["hw"])),
            "bad": (bad, dict(against=keys["five"], cell_timeout=4, timeout=120)),
            "slow": (slow, dict(against=keys["hw"], cell_timeout=600, timeout=30)),
            "dies": (folder / "dies.ipynb", dict(against=keys["hw"], cell_timeout=20, timeout=60)),
            "cheat": (folder / "cheat.ipynb", dict(against=keys["hw"]))}
    private = tmp_path_factory.mktemp("scratch")  # the grader's scratch folders go here, not to the shared /tmp
    scratch = lambda: sorted(private.glob("lecturekit-grade-*"))  # noqa: E731
    files_before = sorted(p.name for p in folder.rglob("*")), sorted(os.listdir(os.getcwd())), scratch()

    def run(item):
        path, kwargs = item
        start = time.perf_counter()
        return grader.grade(path, **kwargs), time.perf_counter() - start

    saved, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(jobs, pool.map(run, jobs.values())))
    finally:
        tempfile.tempdir = saved
    files_after = sorted(p.name for p in folder.rglob("*")), sorted(os.listdir(os.getcwd())), scratch()
    return dict(results, files=(files_before, files_after), folder=folder, keys=keys, hw=hw)


@pytest.mark.slow
def test_grader_scores_and_reports_in_the_design_format(synthetic):
    report, _ = synthetic["good"]
    assert report.to_json() == {
        "notebook": "good.ipynb", "score": 2.0, "max_score": 3.5,
        "exercises": [{"id": "double", "points": 2.0, "max_points": 2.0, "passed": True, "message": ""},
                      {"id": "half", "points": 0.0, "max_points": 1.5, "passed": False,
                       "message": "AssertionError: [half] double(0.25) is not the expected value: it is about "
                                  "0.5 times what it should be"}]}
    table = grader.format_report(report)
    assert "double" in table and "2/2" in table and "total" in table and "2/3.5" in table


@pytest.mark.slow
def test_grader_survives_raising_looping_chatty_and_writing_submissions(synthetic):
    report, seconds = synthetic["bad"]
    by_id = {e.id: e for e in report.exercises}
    assert by_id["raises"].message == "RuntimeError: boom" and not by_id["raises"].passed
    assert by_id["chatty"].passed and by_id["writes"].passed  # 10 MB printed, files written: no harm
    assert not by_id["loops"].passed and "time limit of 4 s per cell" in by_id["loops"].message
    assert by_id["after"].passed  # the kernel was interrupted, not lost
    assert report.score == 3 and report.max_score == 5
    assert len(report.log) <= grader.LOG_BYTES and seconds < 110
    before, after = synthetic["files"]
    assert before == after  # files went to a scratch folder, now removed; the grader's cwd is untouched
    assert not (synthetic["folder"] / "student" / "junk.bin").exists()


@pytest.mark.slow
def test_grader_kills_a_notebook_over_its_time_limit_and_reports_unrun_cells(synthetic):
    report, seconds = synthetic["slow"]
    # The cell sleeps 600 s and the notebook's limit is 30 s: well under 600 s means it was killed. (Not a
    # speed bar: kernel start-up in the sandbox takes tens of seconds on a loaded 2-core machine.)
    assert seconds < 300
    by_id = {e.id: e for e in report.exercises}
    assert by_id["double"].passed
    assert not by_id["half"].passed and "time limit of 30 s" in by_id["half"].message
    assert report.score == 2 and report.max_score == 3.5


@pytest.mark.slow
def test_grader_reports_a_dead_kernel_and_an_unreadable_file(synthetic, tmp_path):
    report, _ = synthetic["dies"]
    assert report.score == 0 and report.max_score == 3.5
    assert all("kernel died" in e.message for e in report.exercises), report.exercises
    for name, content in (("junk.ipynb", b"{not json"), ("latin.ipynb", "{'é'}".encode("latin-1")),
                          ("list.ipynb", b"[]"), ("cells.ipynb", b'{"cells": [{"cell_type": "code", "source": 5}]}')):
        (tmp_path / name).write_bytes(content)
        report = grader.grade(tmp_path / name, against=synthetic["keys"]["hw"])
        assert report.score == 0 and report.max_score == 3.5 and len(report.exercises) == 2
        assert all(e.message.startswith("could not read the notebook") for e in report.exercises), report.exercises


@pytest.mark.slow
def test_grading_against_the_assignment_restores_its_checks_and_points(synthetic):
    report, _ = synthetic["cheat"]
    assert [(e.id, e.points, e.max_points, e.passed) for e in report.exercises] == [
        ("double", 0.0, 2.0, False), ("half", 0.0, 1.5, False)]
    assert report.exercises[0].message.startswith("AssertionError: [double] double(3) is not the expected value")
    assert report.exercises[1].message == "graded cell missing" and report.max_score == 3.5


def test_a_key_needs_the_solution_and_value_checks(tmp_path):
    assignment = tmp_path / "assignments" / "hw.ipynb"
    assignment.parent.mkdir()
    _write(assignment, SETUP, "def double(x):\n    raise NotImplementedError()", _graded("double", "double"))
    with pytest.raises(ValueError, match="needs the instructor's solution"):
        grader.load_key(assignment)
    advisory = _write(tmp_path / "advisory.ipynb", SETUP, _function("double"),
                      "grading.exercise('double', points=1)\ngrading.check(double(1) == 2, 'double(1) is 2')")
    with pytest.raises(ValueError, match="compares no value"):
        grader.load_key(advisory)
    broken = _write(tmp_path / "broken.ipynb", SETUP, _function("double"), _graded("double", "double", 1, 1.0, 5.0))
    with pytest.raises(RuntimeError, match="fails in cell 2"):
        grader.load_key(broken)


def test_grader_refuses_without_a_sandbox_unless_asked(tmp_path, monkeypatch):
    hw = _write(tmp_path / "hw.ipynb", SETUP, _function("double"), _graded("double", "double"))
    key = grader.load_key(hw)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    assert grader.sandbox_available()[0] is False
    with pytest.raises(grader.SandboxUnavailable, match="no-sandbox"):
        grader.grade(hw, against=key)


@pytest.mark.slow
def test_cli_grades_a_folder_into_one_csv_row_per_student(tmp_path):
    hw = _write(tmp_path / "hw.ipynb", SETUP, _function("double", "return 2 * x"),
                _graded("double", "double", 2, 3.0, 6.0))
    folder = tmp_path / "submissions"
    for student, answer in (("alice", "return 2 * x"), ("bob", "return x + 1"), ("=cmd", "return x + x")):
        (folder / student).mkdir(parents=True)
        _student(hw, folder / student / "hw.ipynb", double=answer)
    out = tmp_path / "scores.csv"
    result = subprocess.run([sys.executable, "-m", "lecturekit.cli", "grade", str(folder), "--against", str(hw),
                             "--csv", str(out), "--json", str(tmp_path / "reports"), "--jobs", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_text().splitlines() == ["student,notebook,double,score,max_score",
                                            "'=cmd/hw,hw.ipynb,2,2,2", "alice/hw,hw.ipynb,2,2,2",
                                            "bob/hw,hw.ipynb,0,0,2"]
    bob = json.loads((tmp_path / "reports" / "bob__hw.json").read_text())
    assert bob["exercises"][0]["message"].startswith("AssertionError: [double] double(3) is not the expected value")
    assert (tmp_path / "reports" / "COMPLETE").is_file()
    assert (tmp_path / "reports" / "similarity.csv").read_text().startswith("exercise,student,similar_to,ratio")


# ---- the real assignments -------------------------------------------------------------------------------

# Known wrong answers: (notebook, exercise, text of the solution block, what a student writes instead).
WRONG = {
    "saliency_of_the_loss": (A1, "saliency", "S = scores.gather(1, target[:, None]).sum()",
                             "S = torch.nn.functional.cross_entropy(scores, target)"),
    "saliency_without_abs": (A1, "saliency", "return grad.abs().amax(1)", "return grad.amax(1)"),
    "saliency_mean_over_channels": (A1, "saliency", "return grad.abs().amax(1)", "return grad.abs().mean(1)"),
    "occlusion_sign_flipped": (A1, "occlusion", "(s0 - s)[:, None, None]", "(s - s0)[:, None, None]"),
    "guided_backprop_without_forward_mask": (A1, "guided_relu", "return (f > 0) * (R > 0) * R",
                                             "return (R > 0) * R"),
    "grad_cam_without_relu": (A1, "grad_cam", "return torch.relu((alpha * A).sum(1)).detach()",
                              "return (alpha * A).sum(1).detach()"),
    "grad_cam_weights_from_activations": (A1, "grad_cam", "alpha = dA.mean((2, 3), keepdim=True)",
                                          "alpha = A.mean((2, 3), keepdim=True)"),
    "pointing_game_wrong_argmax_axis": (A1, "pointing_game", "rows, cols = peak // W, peak % W",
                                        "rows, cols = peak % H, peak // H"),
    "l2_penalty_on_the_scores": (A2, "class_vis_step", "objective = S - l2_weight * (x - 0.5).pow(2).flatten(1).sum(1)",
                                 "objective = S - l2_weight * S.pow(2)"),
    "blurring_the_gradient": (A2, "class_vis_step", "g = x.grad\n",
                              "g = blur(x.grad, blur_sigma) if blur_sigma > 0 else x.grad\n        blur_sigma = 0\n"),
    "image_gradient_not_zeroed": (A2, "class_vis_step", "x.grad.zero_()", "pass"),
    "total_variation_one_axis": (A2, "total_variation", "return (dx * dx + dy * dy).pow(beta / 2).sum()",
                                 "return (dx * dx).pow(beta / 2).sum()"),
    "dream_step_not_normalised": (A2, "dream_step", "g = g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)",
                                  "g = g"),
    "inversion_loss_not_normalised": (A2, "inversion_loss", "return diff / norm +", "return diff +"),
    "gram_without_normalisation": (A3, "gram", "return F @ F.transpose(1, 2) / F.shape[-1]",
                                   "return F @ F.transpose(1, 2)"),
    "gram_over_positions": (A3, "gram", "return F @ F.transpose(1, 2) / F.shape[-1]",
                            "return F.transpose(1, 2) @ F / F.shape[-1]"),
    "content_loss_summed": (A3, "content_loss", "return (F - P).pow(2).flatten(1).mean(1)",
                            "return (F - P).pow(2).flatten(1).sum(1)"),
    "style_loss_ignores_layer_weights": (A3, "style_loss", "loss = loss + layer_weights[layer] * (G - G_hat)",
                                         "loss = loss + (G - G_hat)"),
    "style_loss_without_4C2": (A3, "style_loss", ".sum((1, 2)) / (4 * C**2)", ".sum((1, 2))"),
    "tv_loss_absolute_values": (A3, "tv_loss", "dx.pow(2).flatten(1).sum(1) + dy.pow(2).flatten(1).sum(1)",
                                "dx.abs().flatten(1).sum(1) + dy.abs().flatten(1).sum(1)"),
    "content_loss_at_the_wrong_layer": (A3, "style_transfer_loss",
                                        "content_loss(acts[content_layer], content_acts[content_layer])",
                                        "content_loss(acts[list(target_grams)[-1]], content_acts[list(target_grams)[-1]])"),
    "fgsm_sign_left_out": (A4, "fgsm", "step = -eps * g.sign() if targeted else eps * g.sign()",
                           "step = -eps * g if targeted else eps * g"),
    "fgsm_targeted_ascends_the_loss": (A4, "fgsm", "step = -eps * g.sign() if targeted else eps * g.sign()",
                                       "step = eps * g.sign()"),
    "fgsm_without_clamp": (A4, "fgsm", "return (x + step).clamp(0, 1).detach()", "return (x + step).detach()"),
    "pgd_without_projection": (A4, "pgd_step", "delta = (x_adv + alpha * g.sign() - x).clamp(-eps, eps)",
                               "delta = x_adv + alpha * g.sign() - x"),
    "pgd_linf_step_projected_onto_the_l2_ball": (
        A4, "pgd_step", "delta = (x_adv + alpha * g.sign() - x).clamp(-eps, eps)",
        "delta = x_adv + alpha * g.sign() - x\n        "
        "delta = delta * (eps / delta.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)"),
    "pgd_eps_on_normalised_values": (A4, "pgd_step", "delta = (x_adv + alpha * g.sign() - x).clamp(-eps, eps)",
                                     "delta = (x_adv + alpha * g.sign() - x).clamp(-eps * model.normalize.std, "
                                     "eps * model.normalize.std)"),
    "fooling_gradient_of_the_wrong_class": (A4, "fooling_loop", "log_p = model(x).log_softmax(1)[0, target]",
                                            "log_p = model(x).log_softmax(1)[0].max()"),
    "fooling_without_stopping_rule": (A4, "fooling_loop", "if log_p.item() >= math.log(threshold):", "if False:"),
    "patch_rows_and_columns_swapped": (A4, "paste_patch", "out[:, :, top:top + s, left:left + s] = patch",
                                       "out[:, :, left:left + s, top:top + s] = patch"),
    # Assignment 0 (issue 13): what the network learned
    "receptive_field_jump_updated_first": (A0, "receptive_field", "r, j, a = r + (k - 1) * j, j * s, a - p * j",
                                           "j = j * s\n        r, a = r + (k - 1) * j, a - p * j"),
    "receptive_field_padding_added": (A0, "receptive_field", "a - p * j", "a + p * j"),
    "receptive_field_start_without_jump": (A0, "receptive_field", "a - p * j", "a - p"),
    "nearest_neighbours_farthest_first": (A0, "nearest_neighbours", "largest=False).indices  # (M, k)",
                                          "largest=True).indices  # (M, k)"),
    "nearest_neighbours_by_cosine": (A0, "nearest_neighbours", "d = torch.cdist(query.double(), bank.double())",
                                     "d = -F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T"),
    "agreement_counts_the_point_itself": (A0, "neighbour_agreement", 'd.fill_diagonal_(float("inf"))', "pass"),
    "agreement_any_neighbour_matches": (A0, "neighbour_agreement", "(labels[idx] == labels[:, None]).float()",
                                        "(labels[idx] == labels[:, None]).any(1).float()"),
    "pca_not_centred": (A0, "pca", "Xc = X - X.mean(0, keepdim=True)", "Xc = X"),
    "pca_without_singular_values": (A0, "pca", "return (Xc @ Vh[:n_components].T).float()",
                                    "return U[:, :n_components].float()"),
    "top_patches_rows_and_columns_swapped": (A0, "top_patches", "row, col = divmod(int(where[n]), w)",
                                             "col, row = divmod(int(where[n]), w)"),
    "top_patches_weakest_first": (A0, "top_patches", "torch.sort(v, descending=True, stable=True)",
                                  "torch.sort(v, descending=False, stable=True)"),
    "top_patches_field_without_start": (A0, "top_patches", "top, left = start + row * jump + P, start + col * jump + P",
                                        "top, left = row * jump + P, col * jump + P"),
    # Inline questions (issue 13): a wrong choice or number scores zero, with the explanation
    "question_pixel_space_groups_classes": (A0, "q_which_space", 'answer_space = "b"', 'answer_space = "a"'),
    "question_field_side_not_area": (A0, "q_field_fraction", "answer_fraction = 0.39", "answer_fraction = 0.625"),
    "question_saliency_survives_randomisation": (A1, "q_randomised_layers", 'answer_randomised = "b"',
                                                 'answer_randomised = "a"'),
    "question_large_patch_is_sharper": (A1, "q_large_patch", 'answer_patch = "b"', 'answer_patch = "a"'),
    "question_no_prior_gives_natural_images": (A2, "q_no_regulariser", 'answer_regulariser = "b"',
                                               'answer_regulariser = "a"'),
    "question_gram_discards_colour": (A3, "q_gram_discards", 'answer_gram = "b"', 'answer_gram = "a"'),
    "question_fgsm_budget_in_grey_levels": (A4, "q_fgsm_budget", "answer_budget = 0.0314", "answer_budget = 8"),
    "question_adversarial_by_memorising": (A4, "q_why_small_works", 'answer_linear = "b"', 'answer_linear = "a"'),
    "question_pixel_and_feature_space_alike": (A0, "q_which_space", 'answer_space = "b"', 'answer_space = "c"'),
    "question_field_in_pixels": (A0, "q_field_fraction", "answer_fraction = 0.39", "answer_fraction = 1600"),
    "question_gradcam_survives_randomisation": (A1, "q_randomised_layers", 'answer_randomised = "b"',
                                                'answer_randomised = "c"'),
    "question_large_patch_changes_nothing": (A1, "q_large_patch", 'answer_patch = "b"', 'answer_patch = "c"'),
    "question_no_prior_gives_grey": (A2, "q_no_regulariser", 'answer_regulariser = "b"', 'answer_regulariser = "c"'),
    "question_gram_discards_correlations": (A3, "q_gram_discards", 'answer_gram = "b"', 'answer_gram = "c"'),
    "question_fgsm_budget_twice_eps": (A4, "q_fgsm_budget", "answer_budget = 0.0314", "answer_budget = 0.0627"),
    "question_adversarial_from_the_clamp": (A4, "q_why_small_works", 'answer_linear = "b"', 'answer_linear = "c"'),
}


def test_every_new_exercise_has_at_least_two_known_wrong_answers():
    new = [A0]  # issue 13: assignment 0, and the inline questions of every assignment
    counts: dict[tuple[str, str], int] = {}
    for notebook, exercise, _, _ in WRONG.values():
        counts[notebook, exercise] = counts.get((notebook, exercise), 0) + 1
    for notebook in (A0, A1, A2, A3, A4):
        nb = nbformat.read(SOLUTIONS / notebook, as_version=4)
        for exercise, _ in grader.graded_cells(nb).values():
            if notebook in new or exercise.startswith("q_"):
                assert counts.get((notebook, exercise), 0) >= 2, (notebook, exercise)


def test_readme_practice_table_names_graded_exercises_and_covers_eleven_parts():
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("### Practice: what the assignments grade, part by part")[1].split("\n\n|")[1].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in ("|" + table).splitlines()[2:]]
    graded = {p.name[:2]: {ex for ex, _ in grader.graded_cells(nbformat.read(p, as_version=4)).values()}
              for p in SOLUTIONS.glob("*.ipynb")}
    covered = []
    for part, _, exercises in rows:
        match = re.match(r"(\d\d): (.*)", exercises)
        if match is None:
            assert exercises == "not graded", part
            continue
        ids = re.findall(r"`([\w\-]+)`", match.group(2))
        assert ids and set(ids) <= graded[match.group(1)], (part, set(ids) - graded[match.group(1)])
        covered.append(part)
    assert len(rows) == 13 and len(covered) >= 11, covered
    listed = {(nb, i) for _, _, e in rows for m in [re.match(r"(\d\d): (.*)", e)] if m
              for i in re.findall(r"`([\w\-]+)`", m.group(2)) for nb in [m.group(1)]}
    assert listed == {(nb, i) for nb, ids in graded.items() for i in ids}  # every graded exercise is in the table


def test_nbgrader_metadata_comes_from_the_markers():
    nb = _notebook("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION",
                   "lk.grading.exercise('f', points=2)\nlk.grading.check_close(f(torch.ones(1)), torch.ones(1))",
                   'md:<!-- lk.grading.manual("why", points=1) -->\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION',
                   "x = 1")
    out = grader.nbgrader_metadata(nb)
    meta = [c.metadata.get("nbgrader") for c in out.cells]
    assert meta[0] == {"grade": False, "locked": False, "solution": True, "grade_id": "f_solution", "schema_version": 3}
    assert meta[1] == {"grade": True, "locked": True, "solution": False, "grade_id": "f", "points": 2.0,
                       "schema_version": 3}
    assert meta[2] == {"grade": True, "locked": False, "solution": True, "grade_id": "why", "points": 1.0,
                       "schema_version": 3}
    assert meta[3] is None and "nbgrader" not in nb.cells[0].metadata  # nb itself is unchanged
    with pytest.raises(ValueError, match="manual"):
        grader.nbgrader_metadata(_notebook("md:Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION"))



def _spans(nb) -> tuple[list[int], dict[str, list[int]]]:
    """Cell indices of the setup (before the first solution block) and of each exercise.

    An exercise's cells run from its solution cell up to the next exercise's solution cell.
    """
    starts = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and grader.BEGIN in c.source]
    graded = {i: m.group(1) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for m in [grader._EXERCISE.search(c.source)] if m}
    spans = {}
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(nb.cells)
        ids = [graded[i] for i in range(start, end) if i in graded]
        assert len(ids) == 1, f"cells {start}-{end} should grade one exercise, found {ids}"
        spans[ids[0]] = [i for i in range(start, end) if nb.cells[i].cell_type == "code"]
    setup = [i for i in range(starts[0]) if nb.cells[i].cell_type == "code"]
    return setup, spans


def _rounds() -> list[tuple[str, list[str]]]:
    """Wrong answers grouped so that a notebook holds at most one per exercise."""
    rounds: list[tuple[str, list[str]]] = []
    for name, (notebook, exercise, _, _) in WRONG.items():
        for nb_name, names in rounds:
            # where later solutions call earlier ones, a wrong gram would break style_loss too: alone
            if notebook in BUILDS_ON_EARLIER_EXERCISES:
                continue
            if nb_name == notebook and exercise not in {WRONG[n][1] for n in names}:
                names.append(name)
                break
        else:
            rounds.append((notebook, [name]))
    return rounds


def _wrong_notebook(notebook: str, names: list[str], folder: Path) -> Path:
    nb = nbformat.read(SOLUTIONS / notebook, as_version=4)
    for name in names:
        _, exercise, old, new = WRONG[name]
        hits = [c for c in nb.cells if old in c.source and grader.BEGIN in c.source]
        assert len(hits) == 1 and hits[0].source.count(old) == 1, f"{name}: {old!r} is not in the solution"
        hits[0].source = hits[0].source.replace(old, new)
    setup, spans = _spans(nb)
    keep = setup + sorted(i for name in names for i in spans[WRONG[name][1]])
    if notebook in BUILDS_ON_EARLIER_EXERCISES:  # keep every cell: later solutions call earlier ones
        keep = list(range(len(nb.cells)))
    nb.cells = [nb.cells[i] for i in keep]
    path = folder / f"{notebook[:2]}_{'+'.join(names)}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="session")
def keys():
    """The answer keys of the real assignments, built once (each runs its solution in this process)."""
    return {notebook: grader.load_key(ASSIGNMENTS / notebook) for notebook in (A0, A1, A2, A3, A4)}


@pytest.fixture(scope="session")
def graded(tmp_path_factory, keys):
    """Reports of the solutions, the untouched assignments and every round of wrong answers, in the
    sandbox, and of the solutions and assignments also without one (``sandbox=False``).

    Graded two at a time (each grader run uses one thread), once per session.
    """
    folder = tmp_path_factory.mktemp("wrong")
    jobs = {f"solution/{p}": (SOLUTIONS / p, None) for p in (A0, A1, A2, A3, A4)}
    jobs.update({f"assignment/{p}": (ASSIGNMENTS / p, None) for p in (A0, A1, A2, A3, A4)})
    jobs.update({f"unsandboxed/solution/{p}": (SOLUTIONS / p, False) for p in (A0, A1, A2, A3, A4)})
    jobs.update({f"unsandboxed/assignment/{p}": (ASSIGNMENTS / p, False) for p in (A0, A1, A2, A3, A4)})
    for notebook, names in _rounds():
        path = _wrong_notebook(notebook, names, folder)
        for name in names:
            jobs[f"wrong/{name}"] = (path, None)

    def run(job):
        path, sandbox = job
        key = keys[{"00": A0, "01": A1, "02": A2, "03": A3, "04": A4}[path.name[:2]]]
        return grader.grade(path, against=key, cell_timeout=60, timeout=240, sandbox=sandbox)

    unique = sorted(set(jobs.values()), key=str)
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = dict(zip(unique, pool.map(run, unique)))
    return {name: reports[job] for name, job in jobs.items()}


def test_catalogue_has_at_least_twelve_wrong_answers_and_each_changes_its_solution():
    assert len(WRONG) >= 12
    rounds = _rounds()
    assert sum(len(names) for _, names in rounds) == len(WRONG)
    for notebook, _, old, _ in WRONG.values():
        assert old in (SOLUTIONS / notebook).read_text(encoding="utf-8") or \
            json.dumps(old)[1:-1] in (SOLUTIONS / notebook).read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [A0, A1, A2, A3, A4])
def test_solutions_score_full_marks(graded, notebook):
    report = graded[f"solution/{notebook}"]
    failed = {e.id: e.message for e in report.exercises if not e.passed}
    assert not failed, report.log[-3000:]
    assert report.score == report.max_score
    assert sum(e.max_points for e in report.exercises if e.kind == "code") == 10  # and the questions' points
    assert len(report.exercises) >= 4 and any(e.kind == "question" for e in report.exercises)
    assert report.manual and all(m.status == "pending manual grading" and m.answer for m in report.manual)
    assert all(grader.BEGIN not in m.answer for m in report.manual)
    print(f"{notebook}: graded in {report.seconds:.1f} s (the key was built once, before)")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [A0, A1, A2, A3, A4])
def test_untouched_assignments_score_zero_on_every_exercise(graded, notebook):
    report = graded[f"assignment/{notebook}"]
    solution = graded[f"solution/{notebook}"]
    assert [e.id for e in report.exercises] == [e.id for e in solution.exercises]
    assert report.score == 0 and report.max_score == solution.max_score
    for e in report.exercises:  # every auto-graded item: the code exercises and the inline questions
        assert not e.passed and e.points == 0, e
        assert ("no answer given" if e.kind == "question" else "NotImplementedError") in e.message, e
    assert report.manual and all(m.status == "no answer" and not m.answer for m in report.manual)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [A0, A1, A2, A3, A4])
def test_without_a_sandbox_solutions_still_score_full_marks_and_assignments_zero(graded, notebook):
    solution = graded[f"unsandboxed/solution/{notebook}"]
    assert solution.score == solution.max_score >= 10
    assignment = graded[f"unsandboxed/assignment/{notebook}"]
    assert assignment.score == 0 and all("NotImplementedError" in e.message for e in assignment.exercises
                                         if e.kind == "code")


def test_withheld_functions_are_the_references_and_forbidden_names(keys):
    assert keys[A1].withheld == ("lecturekit.attribution.cam", "lecturekit.attribution.grad_cam",
                                 "lecturekit.attribution.guided_backprop", "lecturekit.attribution.guided_relu",
                                 "lecturekit.attribution.occlusion", "lecturekit.attribution.saliency",
                                 "lecturekit.evaluation.pointing_game")
    assert "lecturekit.synthesis.ascent_step" in keys[A2].withheld  # reached through `reference = ...` in a loop
    assert "lecturekit.synthesis.total_variation" in keys[A2].withheld
    assert "lecturekit.features.activations" not in keys[A1].withheld  # an input of a check, not a reference


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WRONG))
def test_known_wrong_answer_loses_its_points(graded, name):
    notebook, exercise, _, _ = WRONG[name]
    report = graded[f"wrong/{name}"]
    by_id = {e.id: e for e in report.exercises}
    wrong = by_id[exercise]
    assert not wrong.passed and wrong.points == 0 < wrong.max_points, (name, wrong)
    assert report.score <= report.max_score - wrong.max_points
    # The graded cell caught it with an explanation (not a crash of the check itself).
    assert wrong.message.startswith("AssertionError: [" + exercise + "]"), wrong.message
    if wrong.kind == "question":  # a wrong choice or number: the report says why the answer is another
        assert "is not the right answer" in wrong.message and wrong.explanation
        assert wrong.explanation[:80] in wrong.message
    print(f"{name}: {wrong.message}")


@pytest.mark.slow
def test_reports_count_free_text_answers_apart_in_json_and_csv(graded):
    solution, assignment = graded[f"solution/{A0}"], graded[f"assignment/{A0}"]
    data = solution.to_json()
    assert data["score"] == data["max_score"] == sum(e["max_points"] for e in data["exercises"])  # auto only
    assert data["manual_max_score"] == 1.0 and [m["id"] for m in data["manual"]] == ["why_pixel_neighbours"]
    assert data["manual"][0]["status"] == "pending manual grading" and "Pixel distance" in data["manual"][0]["answer"]
    question = next(e for e in data["exercises"] if e["id"] == "q_which_space")
    assert question["kind"] == "question" and question["passed"] and "trained to separate" in question["explanation"]
    assert "kind" not in data["exercises"][0]  # code exercises keep the DESIGN.md format
    rows = grader.reports_to_csv({"alice": solution, "bob": assignment}).splitlines()
    assert rows[0].endswith("score,max_score,why_pixel_neighbours (manual),manual_max_score")
    assert rows[1].endswith(f"{solution.max_score:g},{solution.max_score:g},pending,1")
    assert rows[2].endswith(f"0,{solution.max_score:g},no answer,1")
    table = grader.format_report(solution)
    assert "why_pixel_neighbours" in table and "not in the total above" in table



def test_two_grader_processes_never_share_a_sandbox_uid():
    # Found when a test run met a second grader on one machine: both took uid 61000 and the first to
    # finish killed the other's kernel ("the kernel died"). Uids are now claimed machine-wide (flock).
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("sandbox uids are only used when grading as root")
    code = ("from lecturekit import grader; import time; print(grader._claim_uid(), flush=True); "
            "time.sleep(5)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(other.stdout.readline())
        mine = grader._claim_uid()
        try:
            assert mine != theirs and mine in grader._SANDBOX_UIDS
        finally:
            grader._release_uid(mine)
    finally:
        other.kill()
        other.wait()
