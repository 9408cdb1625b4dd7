"""The layout's promises (docs/ARCHITECTURE.md): one list of modes, strategies that own their
sizing, no import cycles, defaults shared by the API, the CLI and the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trimode import SamplingParams, defaults
from trimode.decoding.registry import STRATEGIES, scratch_slots
from trimode.decoding.strategy import Strategy
from trimode.params import FieldError

SRC = Path(__file__).resolve().parents[1] / "src" / "trimode"


def test_registry_names_the_modes_defaults_lists():
    assert tuple(STRATEGIES) == defaults.DECODING_MODES
    assert tuple(m for m, s in STRATEGIES.items() if s.parallel) == defaults.PARALLEL_MODES
    assert defaults.MODES == defaults.DECODING_MODES + (defaults.AUTO,)
    assert set(defaults.THRESHOLD) == set(STRATEGIES)
    for mode, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.mode == mode


@pytest.mark.parametrize("mode", list(STRATEGIES))
def test_python_api_cli_and_server_share_defaults(mode):
    from trimode.entrypoints.cli.generate import sampling_params
    from trimode.entrypoints.cli.main import build_parser
    from trimode.entrypoints.server.app import ServerConfig

    api = SamplingParams(mode=mode)
    cli = sampling_params(build_parser().parse_args(["generate", "--mode", mode, "x"]))
    assert cli == api
    assert api.max_tokens == defaults.MAX_TOKENS == ServerConfig("m").max_tokens
    expected = defaults.THRESHOLD[mode]
    assert api.threshold == expected
    serve = build_parser().parse_args(["serve", "--mode", mode])
    assert serve.max_tokens == defaults.MAX_TOKENS and serve.threshold is None  # = mode default


def test_auto_takes_the_threshold_of_the_mode_it_resolves_to():
    from dataclasses import replace

    auto = SamplingParams(mode="auto")
    for mode in defaults.DECODING_MODES:
        assert replace(auto, mode=mode).threshold == defaults.THRESHOLD[mode]
    assert replace(SamplingParams(mode="auto", threshold=None), mode="diffusion").threshold is None


def test_field_error_names_the_field():
    with pytest.raises(FieldError) as info:
        SamplingParams(top_p=1.5)
    assert info.value.field == "top_p" and str(info.value).startswith("top_p must be in (0, 1]")
    assert isinstance(info.value, ValueError)


def test_strategies_own_their_sizing():
    # the numbers engine admission relied on before the strategies owned them
    assert scratch_slots("ar", 8, 100) == 2
    assert scratch_slots("diffusion", 8, 3) == 17
    assert scratch_slots("linear_spec", 8, 3) == 7
    assert scratch_slots("quadratic_spec", 8, 100, None) == 8 + 8 * 8 + 1
    assert scratch_slots("quadratic_spec", 8, 100, 2) == 8 + 2 * 8 + 1
    assert STRATEGIES["diffusion"].generated_positions(8, 17) == 24
    assert STRATEGIES["linear_spec"].generated_positions(8, 17) == 17
    assert STRATEGIES["ar"].step_width(8, 100, 1) == 1
    assert STRATEGIES["quadratic_spec"].step_width(8, 100, 1) == 16


def _imports(path: Path, module: str) -> set[str]:
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            prefix = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(prefix + ([node.module] if node.module else []))
            out.update(f"{target}.{a.name}" for a in node.names)
            out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_import_cycles_between_modules():
    """Lazy (function-level) imports count too: a cycle is a cycle."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {m: {t for t in _imports(p, m) if t in modules and t != m}
             for m, p in modules.items()}
    # a package's __init__ re-exporting its modules is not a cycle through the package
    for m in modules:
        graph[m] -= {p for p in graph[m] if modules[p].name == "__init__.py" and m.startswith(p + ".")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_decoding_never_imports_the_engine_or_entrypoints():
    for path in (SRC / "decoding").glob("*.py"):
        module = "trimode.decoding." + path.stem
        bad = {t for t in _imports(path, module)
               if t.startswith(("trimode.engine", "trimode.entrypoints"))}
        assert not bad, (path.name, bad)
