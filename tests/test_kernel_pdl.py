"""Programmatic dependent launch (kernels/pdl.py): the rule that makes it safe, checked on the
source of every kernel module. A kernel launched with `launch_pdl` may start before the
previous kernel has finished, so it must wait (`wait_prior()`) before its first load, store or
return; and a kernel launched plainly after one that did not wait would lose the transitive
ordering. Hence: every kernel waits first (or, in WEIGHTS_FIRST, loads nothing but dense
weights, which no kernel writes, before it waits), and every launch passes `**pdl.LAUNCH`. The
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


# Kernels that may load weights (pointers named w_*) and the named pointers before waiting, to
# overlap the previous kernel. The one-row GEMV's dense weights and the router rows the
# residual-add norm multiplies are written by no kernel. The
# MoE down GEMV always follows the gate/up GEMV (test_down_gemv_follows_gate_up), whose
# programs waited for every kernel before it: the routing, an expert cache's slot map and the
# weights it copied are final when down starts; only gate/up's output is not.
WEIGHTS_FIRST: dict[str, set[str]] = {
    "linear._gemv_partials_kernel": set(),
    "moe_gemv._down_kernel": {"experts_ptr", "slot_ptr"},
    "norm_rope._add_rms_norm_kernel": set(),
}


def _is_wait(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", "") == "wait_prior"


def _weights_only(stmt: ast.AST, allowed: frozenset[str] = frozenset()) -> bool:
    """No store, atomic or return in stmt; every tl.load's address starts from a w_* pointer
    or an `allowed` one (offsets aside) and from no other *_ptr; a helper called with *_ptr
    arguments counts as loading them."""
    for node in ast.walk(stmt):
        if isinstance(node, ast.Return):
            return False
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute):
            if node.func.attr == "store" or node.func.attr.startswith("atomic"):
                return False
            if node.func.attr == "load":
                names = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)}
                weights = {n for n in names if n.startswith("w_") or n in allowed}
                others = {n for n in names - weights if n.endswith("_ptr")}
                if not weights or others:
                    return False
        elif isinstance(node.func, ast.Name) and node.func.id != "wait_prior":
            args = {a.id for a in node.args if isinstance(a, ast.Name)}
            if {a for a in args if a.endswith("_ptr")} - allowed:
                return False
    return True


def _waits_before_data(stmts: list[ast.stmt], allowed: frozenset[str] = frozenset()) -> bool:
    """Every path through stmts reaches wait_prior() having loaded only weights (and the
    `allowed` pointers)."""
    for stmt in stmts:
        if isinstance(stmt, ast.Expr) and _is_wait(stmt.value):
            return True
        if any(_is_wait(n) for n in ast.walk(stmt)):
            return (
                isinstance(stmt, ast.If)
                and _weights_only(stmt.test, allowed)
                and _waits_before_data(stmt.body, allowed)
                and _waits_before_data(stmt.orelse, allowed)
            )
        if not _weights_only(stmt, allowed):
            return False
    return False


def test_every_kernel_waits_for_its_predecessor_first() -> None:
    kernels, _ = _kernels_and_launches()
    assert len(kernels) >= 15 and set(kernels) >= set(WEIGHTS_FIRST)
    late = []
    for name, fn in kernels.items():
        body = fn.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        if name in WEIGHTS_FIRST:
            ok = _waits_before_data(body, frozenset(WEIGHTS_FIRST[name]))
        else:
            first = body[0]
            ok = isinstance(first, ast.Expr) and _is_wait(first.value)
        if not ok:
            late.append(name)
    assert not late, f"kernels that load, store or return before wait_prior(): {late}"


def test_weights_first_rule_catches_an_early_activation_load() -> None:
    """The WEIGHTS_FIRST check rejects a kernel that reads its input before the wait, or has
    a path (a branch) that never waits."""
    early = ast.parse(
        "def k(x_ptr, w_ptr):\n    w = tl.load(w_ptr)\n    x = tl.load(x_ptr)\n    wait_prior()\n"
    ).body[0]
    branch = ast.parse(
        "def k(w_ptr, Q):\n    w = tl.load(w_ptr)\n    if Q:\n        wait_prior()\n"
        "    else:\n        pass\n"
    ).body[0]
    fine = ast.parse(
        "def k(x_ptr, w_ptr, Q):\n    w = tl.load(w_ptr + 1)\n    if Q:\n        wait_prior()\n"
        "        x = tl.load(x_ptr)\n    else:\n        wait_prior()\n"
    ).body[0]
    assert isinstance(early, ast.FunctionDef) and isinstance(branch, ast.FunctionDef)
    assert isinstance(fine, ast.FunctionDef)
    assert not _waits_before_data(early.body)
    assert not _waits_before_data(branch.body)
    assert _waits_before_data(fine.body)
    helper = ast.parse(
        "def k(x_ptr, e_ptr, w_ptr):\n    e = row(e_ptr, 0)\n    w = tl.load(w_ptr + e)\n"
        "    wait_prior()\n"
    ).body[0]
    assert isinstance(helper, ast.FunctionDef)
    assert not _waits_before_data(helper.body)  # a helper's loads count
    assert _waits_before_data(helper.body, frozenset({"e_ptr"}))


def test_down_gemv_follows_gate_up() -> None:
    """fused_moe launches the down GEMV right after the gate/up GEMV, with nothing between
    them that launches a kernel (host-side plans and an uninitialised buffer only): what lets
    _down_kernel read the routing before its wait (WEIGHTS_FIRST)."""
    tree = ast.parse((KERNELS / "fused_moe.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "fused_moe")
    calls = [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
    ]
    calls.sort(key=lambda c: (c.lineno, c.col_offset))
    names = [c.func.id if isinstance(c.func, ast.Name) else c.func.attr for c in calls]
    start, end = names.index("gemv_gate_up_act"), names.index("gemv_down")
    between = set(names[start + 1 : end])
    host_side = {
        "down_rows", "activation_bound", "half_products", "gemv_config", "real_k", "alloc",
        "sums_in_down",
    }  # fmt: skip
    assert start < end and between <= host_side, between


def test_gate_up_lets_down_launch_only_after_its_wait() -> None:
    """Under the early trigger (MOESERVE_PDL_EARLY=1) a kernel lets its successor launch before
    its own wait; the down GEMV reads the routing before its wait, so the gate/up GEMV ahead
    of it must trigger late (wait_prior(LATE=True)), else down could read the routing of the
    previous step."""
    tree = ast.parse((KERNELS / "moe_gemv.py").read_text())
    fn = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name == "_gate_up_act_kernel"
    )
    waits = [n for n in ast.walk(fn) if _is_wait(n)]
    assert waits and all(
        any(kw.arg == "LATE" and ast.literal_eval(kw.value) is True for kw in w.keywords)
        for w in waits
    )


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
