"""phloemfile.py's ``Function(custom_domains=[...])`` as a branch sees it: the function's
list on the default branch only, the ``branch=`` callback's on any, names checked (the
neon.ts side runs against a platform in tests/control/test_domains.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phloem.config import BranchInfo
from phloem.project.domains import check_unique
from phloem.project.plan import ConfigError, load_project

MAIN = BranchInfo(name="main", id="br-main", is_default=True)
CHILD = BranchInfo(name="dev", id="br-dev", parent_id="br-main")


def project(tmp_path: Path, api: str, branch: str = "None") -> Path:
    root = tmp_path / "proj"
    root.mkdir(exist_ok=True)
    (root / "app.py").write_text("async def app(scope, receive, send): ...\n")
    (root / "phloemfile.py").write_text(
        "from phloem.config import Function, define_config\n"
        f"config = define_config(functions={{'api': Function(source='app.py', {api})}},\n"
        f"                       branch={branch})\n")
    return root


def test_default_branch_only_unless_the_callback_says(tmp_path: Path) -> None:
    root = project(tmp_path, "custom_domains=['API.example.com.']",
                   "lambda b: {} if b.is_default else "
                   "{'functions': {'api': {'custom_domains': ['dev.example.com']}}}")
    assert load_project(root).resolve(MAIN).functions["api"].custom_domains == \
        ("api.example.com",)
    assert load_project(root).resolve(CHILD).functions["api"].custom_domains == \
        ("dev.example.com",)
    root = project(tmp_path, "custom_domains=['api.example.com']")
    assert load_project(root).resolve(CHILD).functions["api"].custom_domains is None


@pytest.mark.parametrize(("api", "message"), [
    ("custom_domains=['api']", "functions.api.custom_domains[0]: 'api' is not a DNS name"),
    ("custom_domains='api.example.com'", "custom_domains: must be a list of host names"),
    ("custom_domains=['a.example.com', 'a.example.com']", "[1]: a.example.com is listed "
                                                           "more than once"),
])
def test_bad_lists_name_the_key_and_rule(tmp_path: Path, api: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_project(project(tmp_path, api)).resolve(MAIN)


def test_a_name_serves_one_function() -> None:
    with pytest.raises(ConfigError, match=re.escape("'a.example.com' is used by both "
                                                    "function 'x' and 'y'")):
        check_unique("neon.ts", {"x": ("a.example.com",), "y": ("a.example.com",)})
