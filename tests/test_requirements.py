"""pyproject.toml and requirements.txt agree, give lower bounds only, and torch's bound covers the torch APIs we use.

TORCH_APIS lists each torch API whose age sets the floor, with a release that has it (the first one where the
boundary was checked) and the source. Each entry carries a pattern that must still match the code (comments and
strings excluded), so an entry for an API no longer used fails here instead of holding the bound up unnoticed.
Versions marked "wheel" were checked in the released torch wheels' own files (the Python sources and stubs, and
libtorch_python for C bindings); PR numbers are pytorch/pytorch pull requests.
"""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("trainer", "nodes")
ARGS = r"(?:[^()]|\([^()]*\))*"  # a call's arguments so far, one level of nested parentheses allowed

# (API, pattern in our code, a release that has it, source)
TORCH_APIS = [
    ("torch.OutOfMemoryError", r"\btorch\.OutOfMemoryError\b", "2.4",
     ("first in 2.4: PR #121702 (merged 2024-04-15) made torch._C._OutOfMemoryError public; wheel: 2.3.1 has only "
      "the private name, 2.4.0 has torch.OutOfMemoryError")),
    ("torch.amp.GradScaler(device)", r"\btorch\.amp\.GradScaler\(", "2.3",
     ("first in 2.3: wheel: torch/amp/grad_scaler.py is absent in 2.2.0 (only torch.cuda.amp.GradScaler), "
      "present in 2.3.1")),
    ("torch.nn.init.*_(..., generator=)", r"\binit\.\w+_\(" + ARGS + r"\bgenerator=", "2.2",
     "first in 2.2: wheel: 2.1.0's nn/init.py has no generator parameter, 2.2.0's has"),
    ("Module.register_forward_hook(always_call=)", r"register_forward_hook\(" + ARGS + r"\balways_call=", "2.1",
     "PR #104278 (2023-06, after the 2.0 release); wheel: present in 2.1.0"),
    ("Module.register_forward_hook(with_kwargs=)", r"register_forward_hook\(" + ARGS + r"\bwith_kwargs=", "2.0",
     "PR #89389 (2022-11); wheel: present in 2.1.0"),
    ("checkpoint(..., use_reentrant=False, **kwargs)", r"\bcheckpoint\(" + ARGS + r"\buse_reentrant=False", "2.1",
     "wheel: 2.1.0 accepts kwargs when use_reentrant=False (older releases not checked)"),
    ("torch._foreach_lerp_(tensors, tensors, scalar)", r"\btorch\._foreach_lerp_\(", "2.1",
     "wheel: in 2.1.0's _VariableFunctions stubs (older releases not checked)"),
    ("torch.autograd.graph.saved_tensors_hooks", r"\btorch\.autograd\.graph\.saved_tensors_hooks\(", "1.10",
     "default saved-tensor hooks, PR #62563 (2021-08), released in 1.10"),
    ("torch.load(weights_only=)", r"\btorch\.load\(" + ARGS + r"\bweights_only=", "1.13",
     "added in 1.13 (release notes)"),
]

# Newer APIs used only behind a fallback (the code catches their absence): they do not raise the floor. Listed, and
# checked against the code, so that a later change that drops the fallback has the entry to move into TORCH_APIS.
TORCH_APIS_WITH_FALLBACK = [
    ("fused=True optimizers on the CPU", r"\bfused=True\b", "2.4", "optim.py falls back to the default kernels"),
    ("torch.nn.attention.sdpa_kernel", r"from torch\.nn\.attention import [^\n]*\bsdpa_kernel\b", "2.3",
     "wheel: torch/nn/attention/ absent in 2.2.0, present in 2.3.1; activation_trace.py falls back"),
    ("torch._C._autograd._top_saved_tensors_default_hooks", r"\b_top_saved_tensors_default_hooks\(", "> 2.5",
     "wheel: absent from libtorch_python in 2.5.0; the checkpointing trace falls back to a ratio without it"),
]


def code_only(source: str) -> str:
    """``source`` with comments and string literals blanked out (same layout), so docstrings can't match."""
    lines = [list(line) for line in source.splitlines(keepends=True)]
    # FSTRING_MIDDLE: the literal text of an f-string, its own token type from Python 3.12 on
    blank = {tokenize.COMMENT, tokenize.STRING} | {t for t, n in tokenize.tok_name.items() if n == "FSTRING_MIDDLE"}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        (start_row, start_col), (end_row, end_col) = tok.start, tok.end
        for row in range(start_row, end_row + 1):
            line = lines[row - 1]
            first = start_col if row == start_row else 0
            last = end_col if row == end_row else len("".join(line).rstrip("\r\n"))
            line[first:last] = " " * (last - first)
    return "".join("".join(line) for line in lines)


@pytest.fixture(scope="module")
def our_code() -> str:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))] + sorted(ROOT.glob("*.py"))
    return "\n".join(code_only(p.read_text(encoding="utf-8")) for p in files)


def pyproject_dependencies() -> list[Requirement]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return [Requirement(r) for r in data["project"]["dependencies"]]


def requirements_txt() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [Requirement(line.split("#", 1)[0]) for line in lines if line.split("#", 1)[0].strip()]


def as_dict(requirements: list[Requirement]) -> dict[str, str]:
    return {r.name.lower(): str(r.specifier) for r in requirements}


def test_pyproject_and_requirements_txt_agree():
    assert as_dict(pyproject_dependencies()) == as_dict(requirements_txt())


def test_dependencies_are_lower_bounds_only():
    # ComfyUI owns the environment: a pin or an upper bound would fight its torch / transformers / numpy.
    for requirement in pyproject_dependencies():
        assert requirement.specifier, f"{requirement.name} has no lower bound"
        assert all(spec.operator == ">=" for spec in requirement.specifier), str(requirement)


def test_torch_lower_bound_covers_the_torch_apis_used():
    (torch,) = [r for r in pyproject_dependencies() if r.name == "torch"]
    floor = max(Version(version) for _, _, version, _ in TORCH_APIS)
    bound = min(Version(spec.version) for spec in torch.specifier)
    newer = [api for api, _, version, _ in TORCH_APIS if Version(version) > bound]
    assert bound >= floor, f"torch>={bound} in pyproject.toml, but the code uses {newer} (torch {floor})"


@pytest.mark.parametrize("api, pattern", [(a, p) for a, p, _, _ in TORCH_APIS + TORCH_APIS_WITH_FALLBACK])
def test_each_listed_torch_api_is_still_used(our_code, api, pattern):
    assert re.search(pattern, our_code), f"{api} no longer appears in {SOURCE_DIRS}: update the table"
