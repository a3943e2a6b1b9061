"""The grader is proven: checks, the assignment generator, the nbval grader and the catalogue of wrong answers.

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

from lecturekit import grading

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
ASSIGNMENTS = ROOT / "assignments"
A1, A2 = "01_which_pixels_matter.ipynb", "02_synthesizing_images.ipynb"
A4 = "04_adversarial.ipynb"


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


def test_make_assignment_keeps_indentation_and_clears_outputs():
    nb = _notebook("def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n",
                   "md:Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION")
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi")]
    nb.cells[0].execution_count = 3
    out = grading.make_assignment(nb)
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
        grading.make_assignment(_notebook(source), "broken.ipynb")


def test_committed_assignments_are_what_the_command_generates():
    solutions = sorted(SOLUTIONS.glob("*.ipynb"))
    assert [p.name for p in solutions] == [A1, A2, A4]
    assert sorted(p.name for p in ASSIGNMENTS.glob("*.ipynb")) == [A1, A2, A4]
    stale = grading.write_assignments(SOLUTIONS, ASSIGNMENTS, check_only=True)
    assert not stale, f"assignments/ is out of date: run `lecturekit assignments` ({stale})"


def test_no_solution_text_leaks_into_assignments():
    for solution in sorted(SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(solution, as_version=4)
        blocks = grading.solution_blocks(nb)
        assert len(blocks) >= 4, f"{solution.name}: expected a solution block per exercise"
        outside = grading.make_assignment(nb)  # everything but the blocks
        outside_text = "\n".join(c.source for c in outside.cells)
        student = (ASSIGNMENTS / solution.name).read_text(encoding="utf-8")
        assert grading.BEGIN not in student and grading.END not in student
        for block in blocks:
            for line in block.splitlines():
                line = line.strip()
                if len(line) >= 12 and line not in outside_text:  # lines also in the scaffold are not leaks
                    assert json.dumps(line)[1:-1] not in student, f"{solution.name} leaks {line!r}"
        stubs = student.count("raise NotImplementedError()") - solution.read_text(encoding="utf-8").count(
            "raise NotImplementedError()")
        assert stubs == len(blocks)


# ---- the grader on small synthetic notebooks (no torch in the kernel) -----------------------------------

SETUP = "from lecturekit import grading"
CHECK = "grading.exercise('double', points=2)\ngrading.check(double(3) == 6, 'double(3) should be 6')"


def _write(path: Path, *cells) -> Path:
    nbformat.write(_notebook(*cells), path)
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Reports of small notebooks that misbehave in every way the issue names, graded two at a time.

    Also records the files of the submissions' folder and of the grader's working directory before
    and after, to show that what a submission writes stays in its scratch folder.
    """
    folder = tmp_path_factory.mktemp("synthetic")
    student = folder / "student"
    student.mkdir()
    jobs = {
        "good": (_write(folder / "good.ipynb", SETUP,
                        "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION", CHECK,
                        "grading.exercise('half', points=1.5)\ngrading.check(double(0.25) == 1, 'one half, please')"),
                 dict()),
        "bad": (_write(student / "bad.ipynb", SETUP,
                       "grading.exercise('raises', points=1)\nraise RuntimeError('boom')",
                       "grading.exercise('chatty', points=1)\nfor _ in range(200):\n    print('x' * 50_000)",
                       "grading.exercise('writes', points=1)\nopen('junk.bin', 'wb').write(b'0' * 10**6)\n"
                       "import os; os.makedirs('deep/er', exist_ok=True)",
                       "grading.exercise('loops', points=1)\nwhile True:\n    pass",
                       "grading.exercise('after', points=1)\ngrading.check(True, '')"),
                dict(cell_timeout=4, timeout=120)),
        "slow": (_write(folder / "slow.ipynb", SETUP, "grading.exercise('first', points=1)",
                        "import time\ntime.sleep(600)", "grading.exercise('never', points=2)"),
                 dict(cell_timeout=600, timeout=30)),
        "dies": (_write(folder / "dies.ipynb", SETUP, "import os\nos._exit(1)", "grading.exercise('after', points=1)"),
                 dict(cell_timeout=20, timeout=60)),
        "cheat": (_write(folder / "cheat.ipynb", SETUP, "def double(x):\n    return x",
                         "grading.exercise('double', points=99)\npass"),  # check edited, 'half' deleted
                  dict(reference=_write(folder / "hw.ipynb", SETUP, "def double(x):\n    raise NotImplementedError()",
                                        CHECK, "grading.exercise('half', points=1.5)\n"
                                        "grading.check(double(0.25) == 0.5, 'one half')"))),
    }
    scratch = lambda: sorted(Path(tempfile.gettempdir()).glob("lecturekit-grade-*"))  # noqa: E731
    files_before = sorted(p.name for p in folder.rglob("*")), sorted(os.listdir(os.getcwd())), scratch()

    def run(item):
        path, kwargs = item
        start = time.perf_counter()
        return grading.grade(path, **kwargs), time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(run, jobs.values())))
    files_after = sorted(p.name for p in folder.rglob("*")), sorted(os.listdir(os.getcwd())), scratch()
    return dict(results, files=(files_before, files_after), folder=folder)


@pytest.mark.slow
def test_grader_scores_and_reports_in_the_design_format(synthetic):
    report, _ = synthetic["good"]
    assert report.to_json() == {
        "notebook": "good.ipynb", "score": 2.0, "max_score": 3.5,
        "exercises": [{"id": "double", "points": 2.0, "max_points": 2.0, "passed": True, "message": ""},
                      {"id": "half", "points": 0.0, "max_points": 1.5, "passed": False,
                       "message": "AssertionError: [half] one half, please"}]}
    table = grading.format_report(report)
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
    assert len(report.log) <= grading.LOG_BYTES and seconds < 110
    before, after = synthetic["files"]
    assert before == after  # files went to a scratch folder, now removed; the grader's cwd is untouched
    assert not (synthetic["folder"] / "student" / "junk.bin").exists()


@pytest.mark.slow
def test_grader_kills_a_notebook_over_its_time_limit_and_reports_unrun_cells(synthetic):
    report, seconds = synthetic["slow"]
    assert seconds < 75
    by_id = {e.id: e for e in report.exercises}
    assert by_id["first"].passed
    assert not by_id["never"].passed and "time limit of 30 s" in by_id["never"].message
    assert report.score == 1 and report.max_score == 3


@pytest.mark.slow
def test_grader_reports_a_dead_kernel_and_an_unreadable_file(synthetic, tmp_path):
    report, _ = synthetic["dies"]
    assert report.score == 0 and report.max_score == 1 and report.exercises[0].message
    junk = tmp_path / "junk.ipynb"
    junk.write_text("{not json")
    report = grading.grade(junk)
    assert report.score == 0 and report.exercises == [] and "could not read" in report.log


@pytest.mark.slow
def test_grading_against_the_assignment_restores_its_checks_and_points(synthetic):
    report, _ = synthetic["cheat"]
    assert [(e.id, e.points, e.max_points, e.passed) for e in report.exercises] == [
        ("double", 0.0, 2.0, False), ("half", 0.0, 1.5, False)]
    assert report.exercises[0].message == "AssertionError: [double] double(3) should be 6"
    assert report.exercises[1].message == "graded cell missing" and report.max_score == 3.5


@pytest.mark.slow
def test_cli_grades_a_folder_into_one_csv_row_per_student(tmp_path):
    folder = tmp_path / "submissions"
    for student, answer in (("alice", "2 * x"), ("bob", "x + 1")):
        (folder / student).mkdir(parents=True)
        _write(folder / student / "hw.ipynb", SETUP, f"def double(x):\n    return {answer}", CHECK)
    out = tmp_path / "scores.csv"
    result = subprocess.run([sys.executable, "-m", "lecturekit.cli", "grade", str(folder), "--csv", str(out),
                             "--json", str(tmp_path / "reports"), "--jobs", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_text().splitlines() == ["student,notebook,double,score,max_score",
                                            "alice/hw,hw.ipynb,2,2,2", "bob/hw,hw.ipynb,0,0,2"]
    bob = json.loads((tmp_path / "reports" / "bob__hw.json").read_text())
    assert bob["exercises"][0]["message"] == "AssertionError: [double] double(3) should be 6"


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
    "l2_penalty_on_the_scores": (A2, "class_vis_step", "objective = S - l2 * (img - 0.5).pow(2).flatten(1).sum(1)",
                                 "objective = S - l2 * S.pow(2)"),
    "blurring_the_gradient": (A2, "class_vis_step", "g = img.grad\n",
                              "g = blur(img.grad, blur_sigma) if blur_sigma > 0 else img.grad\n        blur_sigma = 0\n"),
    "image_gradient_not_zeroed": (A2, "class_vis_step", "img.grad.zero_()", "pass"),
    "total_variation_one_axis": (A2, "total_variation", "return (dx * dx + dy * dy).pow(beta / 2).sum()",
                                 "return (dx * dx).pow(beta / 2).sum()"),
    "dream_step_not_normalised": (A2, "dream_step", "g = g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)",
                                  "g = g"),
    "inversion_loss_not_normalised": (A2, "inversion_loss", "return diff / norm +", "return diff +"),
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
}


def _spans(nb) -> tuple[list[int], dict[str, list[int]]]:
    """Cell indices of the setup (before the first solution block) and of each exercise.

    An exercise's cells run from its solution cell up to the next exercise's solution cell.
    """
    starts = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and grading.BEGIN in c.source]
    graded = {i: m.group(1) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for m in [grading._EXERCISE.search(c.source)] if m}
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
        hits = [c for c in nb.cells if old in c.source and grading.BEGIN in c.source]
        assert len(hits) == 1 and hits[0].source.count(old) == 1, f"{name}: {old!r} is not in the solution"
        hits[0].source = hits[0].source.replace(old, new)
    setup, spans = _spans(nb)
    keep = setup + sorted(i for name in names for i in spans[WRONG[name][1]])
    nb.cells = [nb.cells[i] for i in keep]
    path = folder / f"{notebook[:2]}_{'+'.join(names)}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    """Reports of the solutions, the untouched assignments and every round of wrong answers.

    Graded two at a time (each grader run uses one thread), once per session.
    """
    folder = tmp_path_factory.mktemp("wrong")
    jobs = {f"solution/{p}": SOLUTIONS / p for p in (A1, A2, A4)}
    jobs.update({f"assignment/{p}": ASSIGNMENTS / p for p in (A1, A2, A4)})
    for notebook, names in _rounds():
        path = _wrong_notebook(notebook, names, folder)
        for name in names:
            jobs[f"wrong/{name}"] = path
    paths = sorted(set(jobs.values()))
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = dict(zip(paths, pool.map(lambda p: grading.grade(p, cell_timeout=60, timeout=240), paths)))
    return {key: reports[path] for key, path in jobs.items()}


def test_catalogue_has_at_least_twelve_wrong_answers_and_each_changes_its_solution():
    assert len(WRONG) >= 12
    rounds = _rounds()
    assert sum(len(names) for _, names in rounds) == len(WRONG)
    for notebook, _, old, _ in WRONG.values():
        assert old in (SOLUTIONS / notebook).read_text(encoding="utf-8") or \
            json.dumps(old)[1:-1] in (SOLUTIONS / notebook).read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [A1, A2, A4])
def test_solutions_score_full_marks(graded, notebook):
    report = graded[f"solution/{notebook}"]
    failed = {e.id: e.message for e in report.exercises if not e.passed}
    assert not failed, report.log[-3000:]
    assert report.score == report.max_score == 10
    assert len(report.exercises) >= 4
    print(f"{notebook}: graded in {report.seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [A1, A2, A4])
def test_untouched_assignments_score_zero_on_every_exercise(graded, notebook):
    report = graded[f"assignment/{notebook}"]
    solution = graded[f"solution/{notebook}"]
    assert [e.id for e in report.exercises] == [e.id for e in solution.exercises]
    assert report.score == 0 and report.max_score == solution.max_score
    for e in report.exercises:
        assert not e.passed and e.points == 0 and "NotImplementedError" in e.message, e


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
    print(f"{name}: {wrong.message}")

