"""A command restarts itself once under jemalloc where it is installed (textclf.process.allocator).

CI machines may not have jemalloc: a copy of another shared library, named like jemalloc, stands in for it, so
the restart itself (same interpreter, same arguments, the library loaded, once) is tested everywhere.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textclf.process.allocator import jemalloc_library

# The child sees `library` as the installed jemalloc, restarts under it, and reports what it runs with.
CHILD = """
import json, os, sys
from textclf.process import allocator
allocator.jemalloc_library = lambda: {library!r}
allocator.restart_under_jemalloc()
print(json.dumps({{"argv": sys.argv[1:], "malloc": allocator.loaded_allocator(),
                  "preload": os.environ.get("LD_PRELOAD", "")}}))
"""


@pytest.fixture
def stand_in_jemalloc(tmp_path) -> str:
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    libm = next((line.split()[-1] for line in maps.splitlines() if "/libm.so" in line), None)
    if libm is None:
        pytest.skip("needs Linux, with the libm this Python runs, to stand in for jemalloc")
    stand_in = tmp_path / "libjemalloc.so.2"
    shutil.copy(libm, stand_in)  # a copy, not a link: /proc/self/maps names the file actually mapped
    return str(stand_in)


def run_child(tmp_path, library: str, env: dict[str, str], *args: str) -> dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(library=library))
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd()), **env}, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout  # the first process was replaced, not run twice
    return json.loads(lines[0])


def test_a_command_restarts_once_under_jemalloc_with_its_arguments(tmp_path, stand_in_jemalloc):
    report = run_child(tmp_path, stand_in_jemalloc, {}, "train", "--seed", "42")
    assert report["argv"] == ["train", "--seed", "42"]
    assert report["malloc"] == "jemalloc" and report["preload"] == stand_in_jemalloc


def test_a_users_preload_is_kept_and_textclf_malloc_system_opts_out(tmp_path, stand_in_jemalloc):
    other = shutil.copy(stand_in_jemalloc, tmp_path / "libother.so")
    report = run_child(tmp_path, stand_in_jemalloc, {"LD_PRELOAD": str(other)})
    assert report["preload"].split() == [stand_in_jemalloc, str(other)] and report["malloc"] == "jemalloc"
    for opt_out in ("system", "glibc"):
        report = run_child(tmp_path, stand_in_jemalloc, {"TEXTCLF_MALLOC": opt_out})
        assert report["malloc"] == "glibc" and report["preload"] == ""


def test_a_preloaded_allocator_of_the_users_is_left_alone(tmp_path, stand_in_jemalloc):
    tcmalloc = str(shutil.copy(stand_in_jemalloc, tmp_path / "libtcmalloc_minimal.so.4"))
    report = run_child(tmp_path, stand_in_jemalloc, {"LD_PRELOAD": tcmalloc})
    assert report["preload"] == tcmalloc and report["malloc"] == "glibc"  # one allocator, not two


def test_without_jemalloc_a_command_runs_as_it_is(tmp_path):
    report = run_child(tmp_path, None, {}, "evaluate")
    assert report == {"argv": ["evaluate"], "malloc": "glibc", "preload": ""}


@pytest.mark.skipif(jemalloc_library() is None, reason="jemalloc is not installed here")
def test_the_installed_jemalloc_is_the_one_loaded(tmp_path):
    report = run_child(tmp_path, jemalloc_library(), {})
    assert report["malloc"] == "jemalloc" and report["preload"] == jemalloc_library()
