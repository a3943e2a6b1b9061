"""The attack catalogue: what a dishonest submission tried (issue 14), and that none of it works.

One batch is graded once per session (``grade_folder``, two at a time, in the sandbox): an honest
submission ("victim") is graded beside the attackers, several times over. Each attack is the cell in
which a student would write ``tv(x)`` (the total variation, graded against
``lk.synthesis.total_variation``); some also edit the graded cell. Every attack must score zero, every
victim full marks, the batch must complete with a report per notebook, and nothing may be left
outside the scratch folders: no file, no process, no change to the package, the key, the instructor's
home or a classmate's notebook.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pytest

import lecturekit
from lecturekit import grader

pytestmark = pytest.mark.slow

SOLUTION = ("def tv(x):\n    ### BEGIN SOLUTION\n    dx = x[..., :-1, 1:] - x[..., :-1, :-1]\n"
            "    dy = x[..., 1:, :-1] - x[..., :-1, :-1]\n    return (dx * dx + dy * dy).sum()\n    ### END SOLUTION")
GRADED = ('lk.grading.exercise("tv", points=2)\n'
          "images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))\n"
          'lk.grading.check_close(tv(images), lk.synthesis.total_variation(images), what="tv(images)")')
STUB = "def tv(x):\n    raise NotImplementedError()"
HONEST = "def tv(x):\n    d1 = x[..., :-1, 1:] - x[..., :-1, :-1]\n    d2 = x[..., 1:, :-1] - x[..., :-1, :-1]\n" \
         "    return (d1 ** 2 + d2 ** 2).sum()"

# name -> the attacker's cell (placeholders: {MARKER} {PORT} {FOLDER} {PACKAGE} {AGAINST} {HOME} {REPORTS}),
# and optionally what it does to the graded cell.
ATTACKS = {
    "nbval_tag": dict(cell=STUB, graded="lk.grading.exercise('tv', points=2)\nprint('tv: correct')",
                      tags=["nbval-skip", "nbval-ignore-output", "raises-exception", "skip-execution"]),
    "results_file": dict(cell=(
        "import os, json\n"
        "row = json.dumps(dict(cell=2, outcome='passed', message='')) + '\\n'\n"
        "for path in [os.environ.get('LECTUREKIT_GRADE_RESULTS', ''), '{REPORTS}/00-victim.json', "
        "'{FOLDER}/results.jsonl', 'results.jsonl']:\n"
        "    try:\n        open(path, 'a').write(row)\n    except OSError:\n        pass\n"
        "print('tv: correct')\n" + STUB)),
    "alias": dict(cell="ref = lk.synthesis.total_variation\ndef tv(x):\n    return ref(x)"),
    "from_import_as": dict(cell="from lecturekit.synthesis import total_variation as t\ndef tv(x):\n    return t(x)"),
    "getattr": dict(cell="def tv(x):\n    return getattr(getattr(lk, 'synth' + 'esis'), 'total_' + 'variation')(x)"),
    "importlib": dict(cell="import importlib\ndef tv(x):\n    return importlib.import_module('lecturekit.synthesis')"
                           ".total_variation(x).float()"),
    "reload": dict(cell="import importlib, sys\nfor name in [m for m in sys.modules if m.startswith('lecturekit')]:\n"
                        "    del sys.modules[name]\nimport lecturekit.synthesis as s\ndef tv(x):\n"
                        "    return s.total_variation(x)"),
    "source_on_disk": dict(cell=(
        "import pathlib, lecturekit.synthesis as s\nns = {{'__name__': 'lecturekit.copy', '__package__': 'lecturekit'}}\n"
        "for path in ['{PACKAGE}/synthesis.py', s.__file__]:\n"
        "    try:\n        exec(compile(pathlib.Path(path).read_text(), path, 'exec'), ns)\n        break\n"
        "    except OSError:\n        pass\n"
        "def tv(x):\n    return ns['total_variation'](x)")),
    "read_withheld_value": dict(cell="def tv(x):\n    return torch.tensor(float(lk.synthesis.total_variation(x)))"),
    "patch_checks": dict(cell=(
        "import torch\nlk.grading.check_close = lambda *a, **k: a[0]\nlk.grading.close_problem = lambda *a, **k: None\n"
        "torch.allclose = lambda *a, **k: True\ntorch.isclose = lambda a, b, **k: torch.ones_like(a, dtype=torch.bool)\n"
        "def tv(x):\n    return x.sum() * 0")),
    "forged_answers": dict(cell=(
        "from IPython.display import display\nimport base64\n"
        "def tv(x):\n    value = dict(type='tensor', dtype='float32', shape=[], requires_grad=False, "
        "data=base64.b64encode(torch.tensor(0.0).numpy().tobytes()).decode())\n"
        "    for _ in range(3):\n"
        "        display({{'application/vnd.lecturekit.answer+json': dict(check='close', what='tv(images)', "
        "value=value, ok=True)}}, raw=True)\n"
        "    return torch.tensor(0.0)")),
    "solutions_next_to_the_package": dict(cell=(
        "import glob, os\nfound = []\n"
        "for root in {{os.path.dirname(os.path.dirname(lk.__file__)), '{COURSE}', '{FOLDER}', '/work', '/root', "
        "'/home', os.path.expanduser('~')}}:\n"
        "    for depth in ('', '*', '*/*', '*/*/*'):\n"
        "        found += glob.glob(os.path.join(root, depth, 'solutions', '*.ipynb'))\n"
        "print('FOUND:', found)\n"
        "for path in found:\n    import nbformat\n    for c in nbformat.read(path, as_version=4).cells:\n"
        "        if c.cell_type == 'code' and 'def tv' in c.source:\n            exec(c.source)\n"
        "if not found:\n" + "\n".join("    " + line for line in STUB.splitlines()))),
    "overwrite_classmates": dict(cell=(
        "import glob, os, json\n"
        "zero = json.dumps(dict(cells=[], metadata={{}}, nbformat=4, nbformat_minor=5))\n"
        "hit = []\n"
        "for path in glob.glob('{FOLDER}/*.ipynb') + glob.glob('../*.ipynb') + glob.glob('/**/*victim*.ipynb', "
        "recursive=False):\n"
        "    try:\n        open(path, 'w').write(zero)\n        hit.append(path)\n    except OSError:\n        pass\n"
        "print('OVERWROTE:', hit)\n" + STUB)),
    "another_kernels_connection_file": dict(cell=(
        "import glob, os, sys\nmine = os.path.realpath(sys.argv[-1])\nothers = []\n"
        "for pattern in ['/tmp/**/kernel*.json', '/tmp/*/ipc/*.json', os.path.expanduser('~/.local/share/jupyter/"
        "runtime/*.json'), '/root/.local/share/jupyter/runtime/*.json', '{FOLDER}/../**/kernel.json']:\n"
        "    others += [p for p in glob.glob(pattern, recursive=True) if os.path.realpath(p) != mine]\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n        cmd = open(f'/proc/{{pid}}/cmdline').read().split('\\0')\n"
        "    except OSError:\n        continue\n"
        "    others += [a for a in cmd if a.endswith('.json') and os.path.realpath(a) != mine]\n"
        "print('OTHERS:', sorted(set(others)))\n"
        "from jupyter_client import BlockingKernelClient\n"
        "for path in set(others):\n    try:\n        kc = BlockingKernelClient(connection_file=path)\n"
        "        kc.load_connection_file()\n        kc.start_channels()\n"
        "        kc.execute('import lecturekit.grading as g; g.close_problem = lambda *a, **k: None')\n"
        "    except Exception as err:\n        print('failed', path, err)\n" + STUB)),
    "setsid_daemon": dict(cell=(
        "import subprocess, sys\n"
        "code = ('import glob, time\\nwhile True:\\n    for p in glob.glob(\"{REPORTS}/*.json\"):\\n'\n"
        "        '        open(p, \"w\").write(\"{{}}\")\\n    open(\"/tmp/{MARKER}-daemon\", \"w\").write(\"x\")\\n'\n"
        "        '    time.sleep(0.2)  # {MARKER}')\n"
        "subprocess.Popen(['setsid', sys.executable, '-c', code], start_new_session=True, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n" + STUB)),
    "edit_package_and_key": dict(cell=(
        "import lecturekit.grading as g\nfailed = []\n"
        "for path in ['{PACKAGE}/grading.py', '{PACKAGE}/synthesis.py', g.__file__, '{AGAINST}']:\n"
        "    try:\n        open(path, 'a').write('\\n# {MARKER}\\n')\n"
        "    except OSError as err:\n        failed.append(type(err).__name__)\n"
        "print('EDIT FAILED:', failed)\n" + STUB)),
    "ipython_startup_file": dict(cell=(
        "import os\npatch = 'import lecturekit.grading as g\\ng.close_problem = lambda *a, **k: None\\n'\n"
        "for home in [os.path.expanduser('~'), '{HOME}', '/root']:\n"
        "    folder = os.path.join(home, '.ipython', 'profile_default', 'startup')\n"
        "    try:\n        os.makedirs(folder, exist_ok=True)\n"
        "        open(os.path.join(folder, '00-{MARKER}.py'), 'w').write(patch)\n"
        "    except OSError:\n        pass\n" + STUB)),
    "kill_or_stop_the_grader": dict(cell=(
        "import os, signal\n"
        "for pid in range(1, 4096):\n"
        "    if pid != os.getpid():\n"
        "        for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
        "            try:\n                os.kill(pid, sig)\n            except OSError:\n                pass\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n" + STUB)),
    "allocate_2_gib": dict(cell="block = bytearray(2 * 1024**3)\n" + HONEST),
    "network": dict(cell=(
        "import socket\nfor host in [('127.0.0.1', {PORT}), ('pypi.org', 443)]:\n"
        "    try:\n        socket.create_connection(host, timeout=3).sendall(b'{MARKER}')\n"
        "        print('CONNECTED', host)\n    except OSError as err:\n        print('NO NETWORK', type(err).__name__)\n"
        + STUB)),
    "many_threads": dict(cell=(
        "import threading, time\nstarted = 0\ntry:\n    for _ in range(2000):\n"
        "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n        started += 1\n"
        "finally:\n    print('THREADS', started)\n" + HONEST)),
    "huge_answer": dict(cell="def tv(x):\n    return torch.zeros(100_000_000)"),
    "keyboard_interrupt": dict(cell="def tv(x):\n    raise KeyboardInterrupt"),
}
VICTIMS = ("00-victim", "08-victim", "16-victim", "99-victim")
MALFORMED = {"zz-cells-not-cells": b'{"cells": [{"cell_type": "code", "source": 5}]}', "zz-list": b"[]",
             "zz-not-json": b"{not json", "zz-not-utf8": "{'é'}".encode("latin-1")}


def _notebook(cells, graded_source=GRADED, tags=None) -> str:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import torch\nimport lecturekit as lk"),
                *(nbformat.v4.new_code_cell(c) for c in cells), nbformat.v4.new_code_cell(graded_source)]
    if tags:
        nb.cells[-1].metadata["tags"] = tags
    return nbformat.writes(nb)


def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _marked(marker: str) -> list[str]:
    """Processes whose command line holds the marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


@pytest.fixture(scope="session")
def batch(tmp_path_factory):
    if not grader.sandbox_available()[0]:
        pytest.skip(grader.sandbox_available()[1])
    root = tmp_path_factory.mktemp("attacks")
    marker = f"LKATTACK{os.getpid()}x{int(time.time())}"
    course = root / "course"
    (course / "solutions").mkdir(parents=True)
    (course / "assignments").mkdir()
    (course / "solutions" / "tv.ipynb").write_text(_notebook([SOLUTION]))
    against = course / "assignments" / "tv.ipynb"
    nbformat.write(grader.make_assignment(nbformat.reads(_notebook([SOLUTION]), as_version=4)), against)
    folder, reports = root / "submissions", root / "reports"
    folder.mkdir()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    received: list[bytes] = []
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100))
                conn.close()
            except OSError:
                continue

    threading.Thread(target=serve, daemon=True).start()
    home = Path.home()
    values = dict(MARKER=marker, PORT=server.getsockname()[1], FOLDER=folder, PACKAGE=Path(lecturekit.__file__).parent,
                  AGAINST=against, HOME=home, REPORTS=reports, COURSE=course)
    for n, (name, attack) in enumerate(ATTACKS.items(), 1):
        cell = attack["cell"].format(**{k: str(v) for k, v in values.items()})
        (folder / f"{n:02d}-{name}.ipynb").write_text(
            _notebook([cell], attack.get("graded", GRADED), attack.get("tags")))
    for victim in VICTIMS:
        (folder / f"{victim}.ipynb").write_text(_notebook([HONEST]))
    for name, content in MALFORMED.items():
        (folder / f"{name}.ipynb").write_bytes(content)
    package = sorted(Path(lecturekit.__file__).parent.rglob("*.py"))
    private = root / "scratch"  # the grader's scratch folders go here, not to the shared /tmp
    private.mkdir()
    before = dict(files=_digest([*package, against, *(folder / f"{v}.ipynb" for v in VICTIMS)]))
    key = grader.load_key(against)
    start = time.perf_counter()
    saved, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        results = grader.grade_folder(folder, against=key, jobs=2, out=reports, cell_timeout=30, timeout=120)
    finally:
        tempfile.tempdir = saved
        done.set()
        key.close()
    seconds = time.perf_counter() - start
    time.sleep(1.0)  # a daemon that survived would have written by now
    after = dict(files=_digest([*package, against, *(folder / f"{v}.ipynb" for v in VICTIMS)]),
                 scratch=sorted(private.iterdir()))
    on_disk = {p.stem: json.loads(p.read_text()) for p in reports.glob("*.json")}
    return dict(results=results, seconds=seconds, before=before, after=after, marker=marker, received=received,
                reports=reports, on_disk=on_disk, home=home, root=root)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_scores_zero(batch, name):
    n = list(ATTACKS).index(name) + 1
    report = batch["results"][f"{n:02d}-{name}"]
    assert report.score == 0 and report.max_score == 2, (name, report.exercises, report.log[-2000:])
    message = report.exercises[0].message
    print(f"{name}: {message}")
    if name in ("alias", "from_import_as", "getattr", "importlib", "reload", "source_on_disk",
                "read_withheld_value"):
        assert "withheld" in message, message
    if name == "keyboard_interrupt":
        assert message.startswith("KeyboardInterrupt") and "time limit" not in message
    if name == "allocate_2_gib":
        assert "MemoryError" in report.log
    if name == "many_threads":
        started = int(report.log.split("THREADS ")[1].split()[0])
        assert started < 300, started  # the process limit stopped it
    if name == "network":
        assert report.log.count("NO NETWORK") == 2 and "CONNECTED" not in report.log
    if name == "solutions_next_to_the_package":
        assert "FOUND: []" in report.log
    if name == "another_kernels_connection_file":
        assert "OTHERS: []" in report.log
    if name == "overwrite_classmates":
        assert "OVERWROTE: []" in report.log
    if name == "edit_package_and_key":
        assert "EDIT FAILED: ['" in report.log and report.log.count("Error") >= 4
    if name == "huge_answer":
        assert "more than a graded answer may be" in message


def test_every_victim_graded_beside_an_attacker_scores_full_marks(batch):
    for victim in VICTIMS:
        report = batch["results"][victim]
        assert report.score == report.max_score == 2, (victim, report.exercises)
        assert batch["on_disk"][victim]["score"] == 2  # the report on disk, after every daemon had its chance


def test_the_batch_completes_with_a_report_for_every_notebook(batch):
    results, reports = batch["results"], batch["reports"]
    assert len(results) == len(ATTACKS) + len(VICTIMS) + len(MALFORMED)
    assert (reports / "COMPLETE").is_file()
    assert set(batch["on_disk"]) == {grader.report_filename(s)[:-5] for s in results}
    for name in MALFORMED:
        report = results[name]
        assert report.score == 0 and report.max_score == 2
        assert report.exercises[0].message.startswith("could not read the notebook"), report.exercises
    print(f"{len(results)} notebooks graded in {batch['seconds']:.0f} s with --jobs 2")


def test_nothing_survives_outside_the_scratch_folders(batch):
    marker = batch["marker"]
    assert batch["before"]["files"] == batch["after"]["files"]  # package, key and victims' notebooks unchanged
    assert batch["after"]["scratch"] == []  # every scratch folder removed
    assert not _marked(marker)  # no daemon left running
    assert batch["received"] == []  # no connection reached the host
    leftovers = [p for p in (*Path("/tmp").glob(f"*{marker}*"), *batch["root"].rglob(f"*{marker}*"),
                             *(batch["home"] / ".ipython").rglob(f"*{marker}*"))]
    assert not leftovers, leftovers


def test_an_interrupted_batch_keeps_the_reports_written_and_no_marker(tmp_path):
    if not grader.sandbox_available()[0]:
        pytest.skip(grader.sandbox_available()[1])
    solution = tmp_path / "tv.ipynb"
    solution.write_text(_notebook([SOLUTION]))
    folder = tmp_path / "submissions"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}.ipynb").write_text(_notebook([HONEST]))
    key = grader.load_key(solution)
    seen = []

    def interrupt(student, report):
        seen.append(report)
        raise KeyboardInterrupt

    private = tmp_path / "scratch"
    private.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        with pytest.raises(KeyboardInterrupt):
            grader.grade_folder(folder, against=key, jobs=2, out=tmp_path / "reports", on_report=interrupt)
    finally:
        tempfile.tempdir = saved
        key.close()
    assert len(seen) == 1 and seen[0].score == 2
    written = list((tmp_path / "reports").glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["score"] == 2
    assert not (tmp_path / "reports" / "COMPLETE").exists()
    for path in (tmp_path / "reports").glob("*.json"):
        assert "time limit" not in path.read_text()
    assert list(private.iterdir()) == []  # every kernel stopped, every scratch folder removed


def test_similarity_report_lists_copies_not_honest_variants(tmp_path):
    solution = tmp_path / "tv.ipynb"
    solution.write_text(_notebook([SOLUTION]))
    key = grader.load_key(solution)
    copied = "def tv(x):\n" + "\n".join("    " + line for line in grader._body(
        key.sources["tv"]["lecturekit.synthesis.total_variation"]).splitlines())
    renamed = HONEST.replace("d1", "a").replace("d2", "b") + "  # renamed"
    submissions = {"copier": _notebook([copied]).encode(), "alice": _notebook([HONEST]).encode(),
                   "bob": _notebook([renamed]).encode(),
                   "carol": _notebook(["def tv(x):\n    h = (x[..., :, 1:] - x[..., :, :-1])[..., :-1, :]\n"
                                       "    v = (x[..., 1:, :] - x[..., :-1, :])[..., :, :-1]\n"
                                       "    total = torch.sum(h.pow(2) + v.pow(2))\n    return total"]).encode()}
    rows = grader.similarity_report(submissions, key, min_tokens=15)
    pairs = {(r["student"], r["similar_to"]) for r in rows}
    assert ("copier", "public source of lecturekit.synthesis.total_variation") in pairs
    assert ("alice", "bob") in pairs  # renaming variables does not hide a copy
    assert not any("carol" in pair for pair in pairs)
    assert grader.similarity_csv(rows).splitlines()[0] == "exercise,student,similar_to,ratio"
    key.close()
