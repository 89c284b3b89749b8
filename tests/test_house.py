"""The house rules of issue 31 that a reviewer would otherwise check by hand: small modules, short functions."""
import ast

from conftest import ROOT

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def test_no_module_under_captioner_is_over_450_lines_and_no_function_over_80():
    too_long = []
    for path in sorted((ROOT / "captioner").rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "split these: " + "; ".join(too_long)
