"""The README and docs/ as a user reads them: every `cascade ...` command in their shell blocks
parses (its flags, and its key=value overrides as config keys), every relative link resolves, and
the README's blocks marked `<!-- runnable -->` (the quick ones) run as written."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def blocks(page: Path):
    """(marker, lines) of each ```bash block; marker: the <!-- runnable... --> comment before it."""
    text = page.read_text()
    for m in re.finditer(r"(<!-- (runnable[^>]*) -->\s*)?```bash\n(.*?)```", text, re.S):
        lines, cur = [], ""
        for ln in m.group(3).splitlines():
            ln = ln.split(" #", 1)[0].rstrip() if not ln.lstrip().startswith("#") else ""
            cur += ln[:-1] + " " if ln.endswith("\\") else ln
            if not ln.endswith("\\"):
                if cur.strip():
                    lines.append(cur.strip())
                cur = ""
        yield (m.group(2) or "").strip(), lines


def commands():
    for page in PAGES:
        for _, lines in blocks(page):
            for ln in lines:
                for part in re.split(r"&&|;", ln):
                    part = part.strip()
                    if part.startswith("cascade "):
                        yield page.name, part


@pytest.mark.parametrize("page, cmd", list(commands()))
def test_every_command_parses(page, cmd):
    from cascade.cli import build_parser
    from cascade.config import load_config
    argv = shlex.split(cmd)[1:]
    if "..." in argv:
        pytest.skip("an elided example")
    args, rest = build_parser().parse_known_args(argv)
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    assert len(extra) == len(rest), f"{page}: unknown flags {rest} in: {cmd}"
    if hasattr(args, "config") and str(args.config).endswith(".yaml") and args.command in ("train", "cache"):
        keys = [e for e in list(getattr(args, "overrides", [])) + extra
                if not e.split("=")[0].startswith(("data.root", "data.manifest"))]
        load_config(REPO / args.config, keys)


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: link to {target} is broken"


def test_runnable_blocks_run(tmp_path):
    """The README's quick blocks, in a folder of their own (the shipped weights and configs
    linked in), with the installed `cascade` command."""
    for name in ("weights", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    cascade = Path(sys.executable).with_name("cascade")
    ran = 0
    for marker, lines in blocks(REPO / "README.md"):
        if marker != "runnable":
            continue
        for ln in lines:
            argv = shlex.split(ln)
            assert argv[0] == "cascade", ln
            r = subprocess.run([str(cascade), *argv[1:], "--no-progress"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{ln}\n{r.stderr[-2000:]}"
            ran += 1
    assert ran >= 2
