"""Programmatic dependent launch (kernels/pdl.py): the rule that makes it safe, checked on the
source of every kernel module. A kernel launched with `launch_pdl` may start before the
previous kernel has finished, so it must wait (`wait_prior()`) before its first load, store or
return; and a kernel launched plainly after one that did not wait would lose the transitive
ordering. Hence: every kernel waits first, and every launch passes `**pdl.LAUNCH`. The
sm_90 compile check (test_kernel_cuda_compile.py) compiles the waits with MOESERVE_PDL=force.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "moeserve" / "kernels"


def _is_jit(node: ast.FunctionDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def _kernels_and_launches() -> tuple[dict[str, ast.FunctionDef], list[tuple[str, ast.Call]]]:
    kernels, launches = {}, []
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            is_def = isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
            if is_def and _is_jit(node):
                kernels[f"{path.stem}.{node.name}"] = node
            # name[grid](...)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id.endswith("_kernel")
            ):
                launches.append((f"{path.stem}.{node.func.value.id}", node))
    return kernels, launches


def test_every_kernel_waits_for_its_predecessor_first() -> None:
    kernels, _ = _kernels_and_launches()
    assert len(kernels) >= 15
    late = []
    for name, fn in kernels.items():
        body = fn.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        first = body[0]
        call = first.value if isinstance(first, ast.Expr) else None
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "wait_prior"):
            late.append(name)
    assert not late, f"kernels whose first statement is not wait_prior(): {late}"


def test_every_launch_passes_the_pdl_option() -> None:
    kernels, launches = _kernels_and_launches()
    launched = {name.split(".")[1] for name, _ in launches}
    assert {name.split(".")[1] for name in kernels} <= launched
    plain = [
        f"{name} (line {call.lineno})"
        for name, call in launches
        if not any(kw.arg is None and ast.unparse(kw.value) == "pdl.LAUNCH" for kw in call.keywords)
    ]
    assert not plain, f"launches without **pdl.LAUNCH: {plain}"


@pytest.mark.parametrize(("setting", "want"), [("0", False), ("force", True)])
def test_switch(setting: str, want: bool) -> None:
    """MOESERVE_PDL=0 turns it off, force on without a GPU; the interpreter never uses it."""
    pytest.importorskip("triton")
    code = "from moeserve.kernels import pdl; print(pdl.ON and pdl.LAUNCH == {'launch_pdl': True})"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MOESERVE_PDL"] = setting
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(want)
    env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
