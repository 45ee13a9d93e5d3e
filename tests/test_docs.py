"""Docs that cannot drift: the command blocks of README.md and docs/*.md marked ``doc-test`` run as
written, in order, one temporary directory per page.

A marker is an HTML comment on the line before a fenced block:

    <!-- doc-test -->                                   run every line as written
    <!-- doc-test: trainer.max_steps=4 -->              ... with this override on fcmae-pretrain /
                                                        fcmae-finetune lines (replacing the same key)
    <!-- doc-test: trainer.max_steps=400->trainer.max_steps=6 -->   ... with this text replaced
    <!-- doc-test skip: needs a GPU -->                 listed, skipped, saying why

Only the step counts are shortened; a renamed key, a changed default or a command that stopped
working fails here instead of for a user.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-test(?P<skip>\s+skip)?(?::\s*(?P<args>.*?))?\s*-->")
APPS = ("fcmae-pretrain", "fcmae-finetune")


def marked_blocks(page: Path):
    """``(line number, skip reason or None, directive, commands)`` of each marked block."""
    lines = page.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.search(line)
        if not m or i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            continue
        body = []
        for nxt in lines[i + 2:]:
            if nxt.startswith("```"):
                break
            body.append(nxt)
        out.append((i + 1, (m.group("args") or "marked skip") if m.group("skip") else None, m.group("args") or "",
                    [b for b in body if b.strip() and not b.lstrip().startswith("#")]))
    return out


def shorten(command: str, directive: str) -> str:
    """Apply a marker's overrides (``key=value``) or replacements (``old->new``) to a command."""
    for item in shlex.split(directive):
        if "->" in item:
            old, new = item.split("->", 1)
            command = command.replace(old, new)
        elif command.lstrip().startswith(APPS):
            key = item.split("=", 1)[0]
            if re.search(rf"(^|\s){re.escape(key)}=\S+", command):
                command = re.sub(rf"(^|\s){re.escape(key)}=\S+", rf"\g<1>{item}", command)
            else:
                head, sep, comment = command.partition("  #")
                command = f"{head.rstrip()} {item}"
    return command


CASES = [(page, blocks) for page in PAGES if (blocks := marked_blocks(page))]


def test_the_main_pages_carry_tested_commands():
    tested = {p.name for p, blocks in CASES if any(skip is None for _, skip, _, _ in blocks)}
    assert {"README.md", "quickstart.md"} <= tested


def test_shorten_replaces_or_appends():
    assert shorten("fcmae-pretrain  # demo", "trainer.max_steps=4") == "fcmae-pretrain trainer.max_steps=4"
    assert shorten("fcmae-pretrain trainer.max_steps=400", "trainer.max_steps=400->trainer.max_steps=6") == \
        "fcmae-pretrain trainer.max_steps=6"
    assert shorten("fcmae-export x --out y", "trainer.max_steps=3") == "fcmae-export x --out y"


@pytest.mark.slow
@pytest.mark.parametrize("page,blocks", CASES, ids=[p.name for p, _ in CASES])
def test_documented_commands_run_as_written(page, blocks, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    ran = 0
    for line_no, skip, directive, commands in blocks:
        if skip is not None:
            print(f"{page.name}:{line_no}: skipped ({skip})")
            continue
        for command in commands:
            command = shorten(command, directive)
            proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, (f"{page.name}:{line_no}: `{command}` exited {proc.returncode}\n"
                                          f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            assert "Traceback" not in proc.stderr, f"{page.name}:{line_no}: `{command}`\n{proc.stderr[-3000:]}"
            ran += 1
    if not ran:
        pytest.skip(f"{page.name}: every marked block is a skip")
