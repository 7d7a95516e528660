"""Values that reach generated scripts: refused, or quoted so that bash reads them as data.

Every check runs the generated text with a real bash and looks for a marker file that a
value would create if it ever became code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.backends.shell_safety import (
    NoControlChars,
    UnsafeValue,
    export_line,
    heredoc,
    reject_control_chars,
    render_command,
    safe_arg,
)


def hostile(marker: Path) -> list[str]:
    """Arguments that run ``touch marker`` if a script ever treats them as code."""
    m = str(marker)
    return [f"x\ntouch {m}", f"$(touch {m})", f"`touch {m}`", f"a;touch {m}", f"'; touch {m}; '",
            f'"; touch {m}; "', f"\\'\ntouch {m}\n#", "a\rb\tc\x1bd\x7fe\x85f\u2028g", "",
            "*", "CLUSTERFLOW_EOF", f"--comment=a b;c && touch {m}"]


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, timeout=30)


def test_render_command_runs_exactly_the_argv_and_stays_on_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    args = hostile(marker)
    line = render_command(["printf", "%s\\0", *args])
    assert "\n" not in line and "\r" not in line
    proc = bash(line, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split("\0")[:-1] == args
    assert not marker.exists()


def test_a_rendered_command_in_a_comment_stays_a_comment(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n# submitted as:\n#   "
                      + render_command(["sbatch", *hostile(marker)]) + "\necho ok\n")
    proc = bash(f"bash {script}", tmp_path)
    assert proc.stdout == b"ok\n", proc.stderr
    assert not marker.exists()


def test_nul_cannot_be_rendered_and_control_chars_are_refused_as_values() -> None:
    with pytest.raises(UnsafeValue, match="NUL"):
        render_command(["echo", "a\x00b"])
    with pytest.raises(UnsafeValue, match="empty command"):
        render_command([])
    for bad in ("a\nb", "a\rb", "a\tb", "\x1b[31m", "a\x7f", "a\x85", "a\u2028b"):
        with pytest.raises(UnsafeValue, match=r"sbatch_args\[0\] .* contains"):
            reject_control_chars(bad, "sbatch_args[0]")
    with pytest.raises(UnsafeValue, match="contains a newline at position 1"):
        safe_arg("a\nb")
    assert safe_arg("a b;c") == "'a b;c'"
    assert reject_control_chars("--comment=a b;c $(x) `y` 'q\"") == "--comment=a b;c $(x) `y` 'q\""


def test_export_line_quotes_values_and_refuses_names_that_are_not_identifiers(
        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    values = hostile(marker)
    script = "\n".join([*(export_line(f"V{i}", v) for i, v in enumerate(values)),
                        "printf '%s\\0' " + " ".join(f'"$V{i}"' for i in range(len(values)))])
    proc = bash(script, tmp_path)
    assert proc.stdout.decode().split("\0")[:-1] == values, proc.stderr
    assert not marker.exists()
    for name in ("A;touch x", "1A", "", "A B", "A\nB", "Ä"):
        with pytest.raises(UnsafeValue, match="not a shell identifier"):
            export_line(name, "v")


def test_heredoc_content_cannot_end_the_heredoc_early(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    content = f"line 1\nCLUSTERFLOW_EOF\ntouch {marker}\nCLUSTERFLOW_EOF_1\n$(touch {marker})\n"
    target = tmp_path / "out.txt"
    proc = bash("\n".join(heredoc(str(target), content)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert target.read_text() == content
    assert not marker.exists()


class _Nested(NoControlChars):
    name: str = "x"
    args: list[str] = []
    env: dict[str, str] = {}
    path: Path | None = None


class _Outer(NoControlChars):
    inner: _Nested = _Nested()


@pytest.mark.parametrize("raw,where", [
    ({"inner": {"name": "a\nb"}}, "inner.name"),
    ({"inner": {"args": ["ok", "--comment=x\ntouch y"]}}, "inner.args"),
    ({"inner": {"env": {"K": "v\r"}}}, "inner.env"),
    ({"inner": {"env": {"K\n": "v"}}}, "inner.env"),
    ({"inner": {"path": "/tmp/a\nb"}}, "inner.path"),
])
def test_models_refuse_control_chars_in_every_string_field(raw: dict, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        _Outer.model_validate(raw)
    [err] = e.value.errors()
    assert ".".join(map(str, err["loc"])) == where
    assert "control characters" in err["msg"]


def test_models_keep_odd_but_safe_values() -> None:
    ok = _Outer.model_validate({"inner": {"name": "a b;c $(d) `e` 'f\"", "args": ["--x=1 2"],
                                          "env": {"K": "v;w"}, "path": "/a b/c"}})
    assert ok.inner.name == "a b;c $(d) `e` 'f\""


class _Step(NoControlChars):
    argv_fields = frozenset({"command"})
    name: str
    command: list[str]


def test_argv_fields_keep_newlines_for_render_command_but_refuse_nul(tmp_path: Path) -> None:
    step = _Step.model_validate({"name": "s", "command": ["python3", "-c", "a = 1\nprint(a)"]})
    proc = bash(render_command(step.command), tmp_path)
    assert proc.stdout == b"1\n", proc.stderr
    with pytest.raises(ValidationError, match=r"item \[1\] .* NUL"):
        _Step.model_validate({"name": "s", "command": ["echo", "a\x00b"]})
    with pytest.raises(ValidationError, match="newline"):
        _Step.model_validate({"name": "s\n", "command": ["true"]})
